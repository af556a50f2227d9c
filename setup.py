"""Only the optional C fast path of the AttributeValue decoder; everything else is in pyproject.toml.

`optional=True`: where no C compiler is available the build goes on without it and
orders_cdc.attrvalue uses its pure-Python fast path (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("orders_cdc._avfast", ["orders_cdc/_avfast.c"], optional=True,
                             extra_compile_args=["-O2"])])
