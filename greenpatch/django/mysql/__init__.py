"""``ENGINE: "greenpatch.django.mysql"``: Django's MySQL backend with greenpatch's pool."""
