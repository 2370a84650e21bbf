"""Prompt sets: bundled names, .txt / .json files, and clear errors for files that are neither."""

import json

import pytest

from diffusion_accel import prompts


def test_bundled_sets_and_files_load(tmp_path):
    assert "default" in prompts.names() and len(prompts.load("default", limit=3)) == 3
    text = tmp_path / "mine.txt"
    text.write_text("# my prompts\na cat\n\n  a dog  \n")
    assert prompts.load(text) == ["a cat", "a dog"]
    listed = tmp_path / "mine.JSON"
    listed.write_text(json.dumps(["a cat", "a dog"]))
    assert prompts.load(listed, limit=1) == ["a cat"]


@pytest.mark.parametrize("name, content, message", [
    ("broken.json", b'["a cat",', r"broken.json is not a JSON list of strings: Expecting"),  # bare JSONDecodeError before
    ("object.json", b'{"prompt": "a cat"}', r"object.json must hold a JSON list of strings"),
    ("latin1.txt", "a caf\u00e9\n".encode("latin-1"), r"latin1.txt is not a UTF-8 text file of prompts"),
    ("empty.txt", b"# nothing\n", r"prompt set '.*empty.txt' is empty"),
])
def test_files_that_are_not_prompt_sets_are_clear_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        prompts.load(tmp_path / name)


def test_unknown_names_and_bad_limits_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown prompt set 'nope': not a bundled set \(.*default"):
        prompts.load("nope")
    with pytest.raises(ValueError, match=r"limit must be >= 1, got 0"):
        prompts.load("default", limit=0)
