"""The version, in a module of its own: the package face (`ckptavg/__init__.py`) and the
modules that record it in files (engine/plan.py, train/saver.py) both import it from here,
so no module imports the package face."""

__version__ = "0.2.0"
