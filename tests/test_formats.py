"""docs/formats.md, done exactly as it shows: its files written from its code blocks into an empty folder, each of its
commands run there (through the entry point's `main`, in-process), and the output it shows found in theirs."""
import re
import shlex
from pathlib import Path

import pytest

from pipelines.train import main as train_main

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
BLOCK = re.compile(r"^```(\w+)( file=(\S+))?\n(.*?)^```$", re.S | re.M)


def doc_steps() -> list[tuple[str, str, str | None]]:
    """(kind, text, file name) of every code block, in the page's order."""
    return [(lang, text, name) for lang, _, name, text in BLOCK.findall(DOC.read_text())]


def test_the_formats_page_runs_as_written(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # as on a new machine
    monkeypatch.chdir(tmp_path)
    steps, ran, shown = doc_steps(), 0, 0
    output = None
    for kind, text, name in steps:
        if name:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        elif kind == "bash":
            (command,) = text.strip().splitlines()
            argv = shlex.split(command)
            assert argv[:3] == ["python", "-m", "pipelines.train"], command
            code = train_main(argv[3:])
            captured = capsys.readouterr()
            output = captured.out + captured.err
            refused = "data.heldout_queries=6" in command
            assert code == (2 if refused else 0), (command, output)
            assert "Traceback" not in output
            ran += 1
        elif kind == "text" and text.startswith(("an example", "error:")):
            missing = [line for line in text.splitlines() if line not in output.splitlines()]
            assert not missing, (missing, output)
            shown += 1
    assert (ran, shown) == (5, 4)  # every command of the page ran, and every output it shows was checked
    assert (tmp_path / "my_principles.json").is_file() and (tmp_path / "my_dataset" / "train.jsonl").is_file()


def test_the_prompt_the_page_shows_is_the_one_the_learner_scores():
    from sami.prompts import training_prompt

    (prompt,) = [text for kind, text, _ in doc_steps() if kind == "text" and text.startswith("System:")]
    constitution = "\n".join(line for line in prompt.splitlines() if re.match(r"\d\. ", line))
    assert prompt == training_prompt("dialogue", constitution, "How do I boil an egg so the yolk stays soft?") + "\n"
