"""Packaging: `kernels/` at the top level installs as the subpackage `fastsr.kernels`.

Metadata lives in pyproject.toml; this file only says where the packages are, because
the user's layout keeps the Triton kernels beside (not inside) the package.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastsr", "fastsr.*"]) + ["fastsr.kernels"]

setup(
    packages=packages,
    package_dir={"fastsr.kernels": "kernels"},
    package_data={"fastsr": ["weights/*.safetensors", "weights/*.md", "csrc/*"]},
    include_package_data=True,
)
