"""sdserve's load generator: bounded closed- or open-loop load, as a library.

- `mix`: the requests (`Mix`: options that cycle independently);
- `drive`: one bounded load against any sender, recording every request (`drive`, `SendError`);
- `report`: what the load did (`Record`, `Report`, `format_summary`);
- `slo`: SLOs from solo latencies, and open-loop rate sweeps (`expected_times`, `assign_slos`,
  `rate_sweep`, `parse_sweep`, `format_sweep`, `slo_key`, `Target`);
- `grpc_target`, `http_target`: senders for the gRPC API and the OpenAI-compatible HTTP API;
- `plot`: a picture of a report or of a rate sweep (matplotlib).

The command line (`sdserve loadtest`) is `sdserve.cli.loadtest`; the benchmarks in bench/ drive
their own senders (an in-process diffusers pipeline) with the same `drive`.
"""

from sdserve.loadtest.drive import Sender, SendError, drive
from sdserve.loadtest.grpc_target import run_loadtest
from sdserve.loadtest.mix import Mix
from sdserve.loadtest.report import Record, Report, format_summary
from sdserve.loadtest.slo import (
    Target,
    assign_slos,
    expected_times,
    format_sweep,
    parse_sweep,
    rate_sweep,
    slo_key,
)

__all__ = [
    "Mix",
    "Record",
    "Report",
    "SendError",
    "Sender",
    "Target",
    "assign_slos",
    "drive",
    "expected_times",
    "format_summary",
    "format_sweep",
    "parse_sweep",
    "rate_sweep",
    "run_loadtest",
    "slo_key",
]
