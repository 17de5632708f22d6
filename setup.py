"""Packaging: `kernels/` at the top level installs as the subpackage `fastsr.kernels`, and
`csrc/` (C++ sources only) as `fastsr/csrc`, where fastsr.ext finds them to build on first use.

Metadata lives in pyproject.toml; this file only says where the packages are, because
the user's layout keeps the Triton kernels beside (not inside) the package.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastsr", "fastsr.*"]) + ["fastsr.kernels", "fastsr.csrc"]

setup(
    packages=packages,
    # csrc/ (the C++ sources fastsr.ext compiles on first use) installs as fastsr/csrc/, as
    # data only: nothing is built at install time.
    package_dir={"fastsr.kernels": "kernels", "fastsr.csrc": "csrc"},
    package_data={"fastsr": ["weights/*.safetensors", "weights/*.md"], "fastsr.csrc": ["*.cpp", "*.h"]},
    include_package_data=True,
)
