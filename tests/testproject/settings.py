import os
from urllib.parse import urlparse

url = urlparse(os.environ.get("GREENPATCH_TEST_DB_URL", "mysql://root@127.0.0.1:3306/test"))

SECRET_KEY = "greenpatch-tests"
INSTALLED_APPS = ["shop"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DATABASES = {
    "default": {
        "ENGINE": os.environ.get("GP_ENGINE", "greenpatch.django.mysql"),
        "NAME": os.environ["GP_DB_NAME"],
        "USER": url.username or "root",
        "PASSWORD": url.password or "",
        "HOST": url.hostname or "127.0.0.1",
        "PORT": str(url.port or 3306),
        "OPTIONS": {"pool": {"max_size": 3, "timeout": 5}},
    }
}
ROOT_URLCONF = "urls"
ALLOWED_HOSTS = ["*"]
DEBUG = False
MIDDLEWARE: list[str] = []
