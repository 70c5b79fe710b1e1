import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "greenpatch" / "__init__.py").read_text()).group(1)

setup(
    name="greenpatch",
    version=version,
    description="Django's ORM and PyMySQL running concurrently on one Tornado IOLoop, through greenlets",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["greenpatch", "greenpatch.*"]),
    python_requires=">=3.11",
    install_requires=[
        "greenlet>=3",
        "tornado>=6.4",
        "PyMySQL>=1.2",
        "wrapt>=1.14",
    ],
    extras_require={
        "django": ["Django>=4.2"],
        "prometheus": ["prometheus_client"],
        "test": [
            "Django>=4.2",
            "pytest>=8",
            "cryptography",
            "ruff>=0.17,<0.18",  # pinned: `ruff format --check` runs in scripts/test
            "prometheus_client",
            "hypothesis",
        ],
    },
    entry_points={"console_scripts": ["greenpatch=greenpatch.__main__:main"]},
    classifiers=[
        "Framework :: Django",
        "Framework :: Tornado",
        "Programming Language :: Python :: 3",
        "Topic :: Database",
    ],
)
