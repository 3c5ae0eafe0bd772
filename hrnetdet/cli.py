"""The ``hrnetdet`` command line. Each subcommand lives beside the code it drives and is listed
here once; ``hrnetdet models`` prints the registry."""
import argparse
import importlib
import sys
from typing import List, Optional

# subcommand -> module defining add_arguments(parser) and run(args) -> int
COMMANDS = {
    "models": "hrnetdet.zoo.commands",
    "convert": "hrnetdet.zoo.commands",
    "download": "hrnetdet.zoo.hub",
    "push": "hrnetdet.zoo.model_zoo",
    "zoo-md": "hrnetdet.zoo.model_zoo",
    "train": "hrnetdet.engine.commands",
    "eval": "hrnetdet.engine.commands",
    "predict": "hrnetdet.inference.commands",
    "export": "hrnetdet.inference.commands",
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hrnetdet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        spec = module.COMMANDS[name]
        p = sub.add_parser(name, help=spec["help"], description=spec["help"])
        spec["add_arguments"](p)
        runners[name] = spec["run"]
    args = parser.parse_args(argv)
    return int(runners[args.command](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
