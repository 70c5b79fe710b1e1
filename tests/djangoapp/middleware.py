from asgiref.sync import markcoroutinefunction


def async_header(get_response):
    """An async-only middleware: under WSGI Django runs it through async_to_sync."""

    async def middleware(request):
        response = await get_response(request)
        response["X-Async"] = "yes"
        return response

    markcoroutinefunction(middleware)
    return middleware


async_header.async_capable = True
async_header.sync_capable = False
