"""``gatekit sites``: where gates would go in a model, before converting it."""
from __future__ import annotations

import argparse

DESCRIPTION = """List the residual blocks gatekit finds in a model (dotted names, as `include=` and
`exclude=` match them), the channels each gate would control, and the convs involved; then the
residual adds it cannot gate, each with the reason. With --exits, list where exit heads would go
instead (gatekit.add_exits), with what a sample leaving at each one costs. With --list, show the
models gatekit can build by name."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("sites", help="list the residual blocks a model would be gated at",
                                 description=DESCRIPTION)
    parser.add_argument("model", nargs="?", help="a model name, e.g. torchvision/resnet50")
    parser.add_argument("--exits", action="store_true",
                        help="list the exit sites (gatekit.add_exits) and what leaving at each costs")
    parser.add_argument("--list", action="store_true", help="list the models gatekit can build by name")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> int:
    import gatekit
    from gatekit.adapters import example_input, get_model, list_models
    from gatekit.errors import GatekitError

    if arguments.list:
        print("\n".join(list_models()))
        return 0
    if not arguments.model:
        raise GatekitError("name a model (e.g. cifar/resnet20), or pass --list to see them.")
    if arguments.exits:
        _print_exits(get_model(arguments.model), example_input(arguments.model))
        return 0
    sites, skipped = gatekit.gate_sites(
        get_model(arguments.model), example_input=example_input(arguments.model), skipped=True
    )
    width = max([len(site.name) for site in sites + skipped] + [len("block")])
    if sites:
        print(f"{'block':<{width}}  channels  gated layer -> consumer  (shortcut)")
    for site in sites:
        print(f"{site.name:<{width}}  {site.channels:8d}  {site.first_conv} -> {site.consumer}  ({site.shortcut})")
    if skipped:
        print(f"\nnot gated ({len(skipped)}): convert leaves these as they are")
    for site in skipped:
        print(f"{site.name:<{width}}  {site.kind}: {site.reason}")
    return 0


def _print_exits(model, example) -> None:
    """One row per exit site: a sample leaving there pays the backbone up to it and every head on the way."""
    import gatekit

    with_exits = gatekit.add_exits(model, example_input=example)
    info = with_exits.gatekit_exits
    costs, dense = info.costs, info.dense_macs
    width = max([len(site.name) for site in info.sites] + [len("after block")])
    print(f"{'after block':<{width}}  channels  stage end  head MACs  MACs on leaving  (of {dense:,})")
    for index, site in enumerate(info.sites):
        leaving = sum(costs.segment_macs[: index + 1]) + sum(costs.head_macs[: index + 1])
        print(f"{site.name:<{width}}  {site.channels:8d}  {'yes' if site.stage_end else 'no':>9}  "
              f"{costs.head_macs[index]:9,}  {leaving:15,}  ({100 * leaving / dense:.1f} %)")
