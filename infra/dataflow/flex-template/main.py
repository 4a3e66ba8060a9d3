"""The flex template's entry point: ``--recipe NAME`` picks the recipe, the rest are its flags.

Dataflow's template launcher runs this file (``FLEX_TEMPLATE_PYTHON_PY_FILE``) with the job's
parameters as ``--name=value`` flags; everything but ``--recipe`` goes to the recipe's
``run(argv)`` (our flags and Beam's, as on the command line).
"""

from __future__ import annotations

import argparse
import importlib
import sys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("--recipe", default="rs5m", help="a module of pipelines.recipes")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(f"pipelines.recipes.{args.recipe}")
    if not hasattr(module, "RECIPE"):
        raise SystemExit(f"--recipe {args.recipe}: pipelines.recipes.{args.recipe} is no recipe")
    from pipelines.recipes import kit

    kit.main(module.RECIPE, rest)


if __name__ == "__main__":
    main()
