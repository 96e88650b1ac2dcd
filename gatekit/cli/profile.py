"""``gatekit profile``: per-input MACs, gate behaviour and accuracy of a model on a dataset."""
from __future__ import annotations

import argparse

import torch

from ._sources import add_data_arguments, add_model_arguments, load_data, load_model

DESCRIPTION = """Run a model over data and report what each input really cost: dense and mean
dynamic MACs (conv + linear, gates included), percentiles, savings, per-block execution and channel
rates, and accuracy when the data has labels."""
EXAMPLES = """examples:
  gatekit profile runs/finetune/model.pt --dataset fashion-mnist --json profile.json --plot profile.png
  gatekit profile cifar/resnet20 --convert --random 3,32,32 --samples 64"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("profile", help="count per-input MACs and gate rates on a dataset",
                                 description=DESCRIPTION, epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--samples", type=int, help="profile at most this many samples (default: all)")
    parser.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG: MAC histogram and per-block rates")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> int:
    import gatekit

    _check(arguments)
    model = load_model(arguments).to(arguments.device)
    data = load_data(arguments, arguments.samples)
    report = gatekit.profile(model, data, batch_size=arguments.batch_size, max_samples=arguments.samples,
                             device=arguments.device, progress=not arguments.quiet)
    print(report.table())
    if arguments.json:
        report.to_json(arguments.json)
    if arguments.plot:
        report.plot(arguments.plot)
    return 0


def _check(arguments: argparse.Namespace) -> None:
    from gatekit.errors import GatekitError

    if arguments.samples is not None and arguments.samples < 1:
        raise GatekitError(f"--samples {arguments.samples}: give a positive number.")
    if arguments.batch_size < 1:
        raise GatekitError(f"--batch-size {arguments.batch_size}: give a positive number.")
    try:
        torch.empty(0, device=arguments.device)
    except (RuntimeError, ValueError) as error:
        raise GatekitError(f"--device {arguments.device}: {error}") from error
