"""The `tunewise` command: one thin command per verb."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, NoReturn

from tunewise.training.host_memory import request_huge_pages

request_huge_pages()  # before torch's first large allocation, which reads it (training/host_memory.py)

import typer
from rich.console import Console
from rich.text import Text

app = typer.Typer(
    help="Fine-tune LLMs with every hyperparameter validated, explained, resolved and measured.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


@app.callback()
def _quiet_libraries() -> None:
    """Our own progress bars and plan say what is happening; the libraries' per-file bars only add noise."""
    import warnings

    import datasets
    import transformers

    # peft calls a transformers property deprecated for v6; harmless, and not the user's to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config (default: the quickstart settings).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key: KEY=VALUE, e.g. --set learning_rate=1e-4 (repeatable)."),
]
AnswerSetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a generation setting: KEY=VALUE, e.g. --set do_sample=true --set temperature=0.7 "
        "(repeatable; generation.*, system_prompt, chat_template, seed, trust_remote_code).",
    ),
]


def _fail(exc: Exception) -> NoReturn:
    err.print(Text.assemble(("error", "bold red"), ": ", str(exc)))
    raise typer.Exit(2)


def _warn(problems: list) -> None:
    for problem in problems:
        err.print(Text.assemble(("warning", "yellow"), ": ", str(problem)))


def _user_errors() -> tuple[type[Exception], ...]:
    from tunewise.config.problems import ConfigError
    from tunewise.data.load import DataError
    from tunewise.models.load import ModelLoadError
    from tunewise.training.checkpoint import CheckpointError
    from tunewise.training.loop import NonFiniteError
    from tunewise.training.memory import TrainingOutOfMemory
    from tunewise.training.resume import ResumeError

    return (
        ConfigError,
        DataError,
        ModelLoadError,
        CheckpointError,
        NonFiniteError,
        ResumeError,
        TrainingOutOfMemory,
    )


@app.command()
def train(
    config: ConfigArg = None,
    checkpoint: Annotated[
        Path | None,
        typer.Argument(help="With --resume: the checkpoint to resume from (default: the newest valid)."),
    ] = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue from the newest valid checkpoint in output_dir, or CHECKPOINT."
        ),
    ] = False,
    force_resume: Annotated[
        bool, typer.Option("--force-resume", help="Resume even though the config changed.")
    ] = False,
) -> None:
    """Fine-tune: plan, evaluate, train, evaluate again, save the run directory.

    Without --resume, an earlier run's files in output_dir are first moved to output_dir/earlier-runs/.
    """
    from tunewise.run import train as run_train

    if checkpoint is not None and not resume:
        _fail(ValueError(f"{checkpoint}: a checkpoint argument needs --resume"))
    if force_resume and not resume:
        # Fix (test_crash_safety.py): it started afresh, moving the run it was meant to continue aside.
        _fail(ValueError("--force-resume continues a run despite a changed config: it needs --resume"))
    try:
        run_train(
            config,
            set_ or [],
            console,
            resume=str(checkpoint) if checkpoint else resume,
            force_resume=force_resume,
        )
    except _user_errors() as exc:
        _fail(exc)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, destroy the process group before the interpreter exits, as accelerate's end_training
    does: left to interpreter teardown, a gloo rank sometimes aborted after a finished run ("terminate called
    without an active exception", test_distributed.py), failing the launch that had trained correctly."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@app.command()
def plan(
    config: ConfigArg = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable object.")] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="Plan for training in N processes (torchrun --nproc_per_node N, accelerate launch "
            "--num_processes N). Under a launcher, its count is used. Default: 1.",
        ),
    ] = None,
) -> None:
    """Resolve everything without training and print the plan: settings and why, steps, memory (the largest
    micro-batch's activations measured with one forward of it), lints."""
    from tunewise.config.resolve import choose_world_size, probe_hardware
    from tunewise.report import plan_summary, print_plan
    from tunewise.run import prepare

    def fail(exc: Exception) -> NoReturn:
        if as_json:
            print(json.dumps({"errors": [str(exc)]}))
            raise typer.Exit(2)
        _fail(exc)

    # As `train` reads it, so auto batch keys and step counts match a launched run.
    try:
        world_size, why = choose_world_size(os.environ, probe_hardware().device_type, processes)
    except ValueError as exc:
        fail(exc)
    if int(os.environ.get("RANK", "0")) > 0:
        return  # launched: rank 0 prints the plan, the others would repeat it
    try:
        prep = prepare(config, set_ or [], world_size, world_size_reason=why)
    except _user_errors() as exc:
        fail(exc)
    if as_json:
        print(json.dumps({**plan_summary(prep), "errors": []}, default=str))
    else:
        print_plan(console, prep)


@app.command()
def explain(
    key: Annotated[str | None, typer.Argument(help="A config key, e.g. lora_alpha.")] = None,
) -> None:
    """Explain a hyperparameter (or list them all)."""
    from tunewise.config.knowledge import explain_all, explain_key

    try:
        console.print(explain_key(key) if key else explain_all())
    except (KeyError, ValueError) as exc:
        _fail(exc)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: Annotated[
        str, typer.Option(help="Base model, run directory or adapter.")
    ] = "smollm2-135m-instruct",
    set_: AnswerSetOpt = None,
) -> None:
    """Answer one prompt with a base model, a run's adapter or a merged model."""
    from tunewise.infer.chat import load_for_chat, reply

    try:
        loaded = load_for_chat(model, set_ or [])
        _warn(loaded.warnings)
        text = reply(loaded, [{"role": "user", "content": prompt}])
    except _user_errors() as exc:
        _fail(exc)
    # Verbatim: a model's `arr[i]` or `[/code]` is no Rich markup, and unwrapped, so a pipe gets the answer whole.
    console.print(Text(text), soft_wrap=True)


@app.command()
def chat(
    model: Annotated[
        str, typer.Option(help="Base model, run directory or adapter.")
    ] = "smollm2-135m-instruct",
    set_: AnswerSetOpt = None,
) -> None:
    """A simple interactive chat (empty line or Ctrl-D quits)."""
    from tunewise.infer.chat import load_for_chat, reply

    try:
        loaded = load_for_chat(model, set_ or [])
    except _user_errors() as exc:
        _fail(exc)
    _warn(loaded.warnings)
    history: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        try:
            text = reply(loaded, history)
        except _user_errors() as exc:
            _fail(exc)
        history.append({"role": "assistant", "content": text})
        console.print(Text.assemble(("model>", "bold"), " ", text))  # the answer verbatim, not as markup


data_app = typer.Typer(help="Look at training data before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    target: Annotated[Path, typer.Argument(help="A YAML config (its training data) or a data file.")],
    model: Annotated[
        str | None, typer.Option(help="Tokenizer's model for a data file (default: the config's model).")
    ] = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable object.")] = False,
) -> None:
    """Rows, format, token lengths, truncation, a recommended max_seq_length, padding waste, examples."""
    from tunewise.data.inspect import inspect_target, print_inspection

    try:
        result = inspect_target(target, set_ or [], model)
    except _user_errors() as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(result))
    else:
        print_inspection(console, result)


@app.command()
def merge(
    adapter: Annotated[Path, typer.Argument(help="A LoRA/QLoRA run directory or a PEFT adapter directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New directory for the merged model.")],
    base: Annotated[
        str | None, typer.Option(help="Base model, if the one the adapter records has moved.")
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            help="Saved weights: float32, or bfloat16 / float16 (half the size; merged in float32)."
        ),
    ] = "float32",
) -> None:
    """Merge an adapter into its base: an HF model (safetensors, tokenizer) any tool loads."""
    from tunewise.models.merge import merge_adapter

    try:
        result = merge_adapter(adapter, output, base, dtype)
    except _user_errors() as exc:
        _fail(exc)
    for note in result.notes:
        console.print(Text.assemble(("note", "yellow"), ": ", note))
    console.print(
        Text.assemble(("Merged model written to", "bold green"), " ", str(result.output_dir.resolve()))
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
