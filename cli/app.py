"""The `llmswarm` command: the root typer app, global options, and the one place errors become
a single line and an exit code."""

from __future__ import annotations

import os
import sys

import typer

from . import output

app = typer.Typer(
    name="llmswarm",
    help="Run large language models across a swarm of volunteer GPUs and CPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app = typer.Typer(help="Measure speed: the swarm against a local run, one server, route solvers.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# Exit codes scripts can rely on.
EXIT_ERROR = 1  # anything we could not do, with the reason on stderr
EXIT_USAGE = 2  # bad flags (typer's own code)
EXIT_MODEL = 3  # unknown model, missing or unreadable checkpoint
EXIT_NETWORK = 4  # no peers, no route, a peer failed
EXIT_INTERRUPTED = 130


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", envvar="LLMSWARM_DEBUG", help="Show tracebacks."),
) -> None:
    if debug:
        os.environ["LLMSWARM_DEBUG"] = "1"


def _register() -> None:
    from . import api, bench, chat, demo, join, models_cmd, probe, status, trust

    app.command("chat")(chat.chat)
    app.command("join")(join.join)
    app.command("bootstrap")(join.bootstrap)
    app.command("models")(models_cmd.models)
    app.command("demo")(demo.demo)
    app.command("probe")(probe.probe)
    app.command("status")(status.status)
    app.command("api")(api.api)
    app.command("trust")(trust.trust)
    bench_app.command("swarm")(bench.bench_swarm)
    bench_app.command("server")(bench.bench_server)
    bench_app.command("quant")(bench.bench_quant)
    bench_app.command("api")(bench.bench_api)
    bench_app.command("hop")(bench.bench_hop)
    bench_app.command("verify")(bench.bench_verify)
    try:
        from . import route
    except ImportError:  # the route solver CLI is optional while it is being built
        return
    app.command("route")(route.route)
    bench_app.command("route")(route.bench_route)


def _exit_code(exc: BaseException) -> int | None:
    from llmswarm.models.errors import LengthError, ModelError
    from llmswarm.node.errors import NodeError, UsageError
    from llmswarm.routing.errors import RoutingError

    if isinstance(exc, LengthError | UsageError):
        return EXIT_USAGE
    if isinstance(exc, ModelError):
        return EXIT_MODEL
    if isinstance(exc, RoutingError | NodeError):
        return EXIT_NETWORK
    return None


try:
    _ExceptionGroup = BaseExceptionGroup
except NameError:  # Python 3.10: trio depends on the backport
    from exceptiongroup import BaseExceptionGroup as _ExceptionGroup


def _unwrap(exc: BaseException) -> BaseException:
    """Trio nurseries wrap errors in exception groups: the person wants the error inside."""
    while isinstance(exc, _ExceptionGroup):
        leaves = list(exc.exceptions)
        ours = [e for e in leaves if _exit_code(_unwrap(e)) is not None]
        exc = (ours or leaves)[0]
    return exc


def _tune_threads() -> None:
    """Before torch loads: GNU OpenMP's threads spin for ~300k iterations (milliseconds) after each
    parallel region. Swarm processes hand a step to one another on shared cores, and a spinning idle
    process steals the core the next one computes on: measured on 2 cores, a short spin took the
    cost of a hop from 7.9 to 3.5 ms with no loss of local speed. A user's own setting wins."""
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def main() -> None:
    _tune_threads()
    _register()
    try:
        code = app(standalone_mode=False)  # returns typer.Exit's code instead of raising it
        if isinstance(code, int) and code:
            sys.exit(code)
    except KeyboardInterrupt:
        output.err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place errors are translated for people
        import click

        try:  # typer >= 0.29 vendors its own click: its usage errors are not the installed click's
            from typer._click.exceptions import ClickException as TyperClickException
        except ImportError:
            TyperClickException = click.ClickException  # noqa: N806
        exc = _unwrap(exc)
        if isinstance(exc, KeyboardInterrupt):
            output.err.print("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(EXIT_INTERRUPTED)
        if isinstance(exc, click.ClickException | TyperClickException):
            exc.show()
            sys.exit(exc.exit_code)
        code = _exit_code(exc)
        if os.environ.get("LLMSWARM_DEBUG") or code is None:
            if code is None:
                output.error_line(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)")
                if not os.environ.get("LLMSWARM_DEBUG"):
                    sys.exit(EXIT_ERROR)
            import traceback

            traceback.print_exception(exc)
            sys.exit(code or EXIT_ERROR)
        output.error_line(str(exc))
        sys.exit(code)


if __name__ == "__main__":
    main()
