"""Prompt sets: bundled names, .txt / .json files, and clear errors for files that are neither."""

import json
from pathlib import Path

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
    with pytest.raises(ValueError, match=r"limit must be None or an int >= 1, got 0"):
        prompts.load("default", limit=0)


@pytest.mark.parametrize("limit", [0, -1, 2.5, "3", True])
def test_prompt_limits_are_ints_of_at_least_one_for_every_kind_of_pipeline(limit):
    """DiT / DDPM took limit=0 as 8 and -1 as none; floats were bare TypeErrors, True one prompt."""
    from diffusion_accel.testing.tiny import build_tiny

    for pipe in (build_tiny("dit"), build_tiny("ddpm")):
        with pytest.raises(ValueError, match="limit must be None or an int >= 1"):
            prompts.for_pipeline(pipe, limit=limit)
    with pytest.raises(ValueError, match="limit must be None or an int >= 1"):
        prompts.load("fashion", limit=limit)


def test_blank_json_prompts_and_byte_order_marks_are_dropped(tmp_path):
    (tmp_path / "blank.json").write_text('["", "  "]', encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        prompts.load(tmp_path / "blank.json")
    (tmp_path / "bom.txt").write_text("\ufeff# a comment\nhello\n", encoding="utf-8")
    (tmp_path / "bom.json").write_text('\ufeff["hi", " "]', encoding="utf-8")
    assert prompts.load(tmp_path / "bom.txt") == ["hello"] and prompts.load(tmp_path / "bom.json") == ["hi"]


def test_class_ids_stop_at_the_classes_the_model_was_trained_on():
    """DiT splits ImageNet labels on commas, so label names outnumber classes: ids past the class count raised
    IndexError or hit the null class until session 41."""
    from diffusion_accel.testing.tiny import build_tiny

    pipe = build_tiny("dit")
    pipe.transformer.register_to_config(num_embeds_ada_norm=4)
    pipe.labels = {name: index // 2 for index, name in enumerate("abcdefgh")}  # 8 names of 4 classes
    assert prompts.for_pipeline(pipe, limit=20) == [0, 1, 2, 3]


def test_a_numpy_integer_limit_is_taken():
    """np.int64(2) was refused as "limit must be None or an int >= 1", unlike numpy scalars elsewhere."""
    import numpy as np

    from diffusion_accel import prompts
    from diffusion_accel.testing.tiny import build_tiny

    assert prompts.load("default", limit=np.int64(2)) == prompts.load("default", limit=2)
    assert prompts.for_pipeline(build_tiny("sd"), limit=np.int64(3)) == prompts.for_pipeline(build_tiny("sd"), limit=3)


def test_a_prompt_file_under_home_is_found(tmp_path, monkeypatch):
    """A recipe's `prompts = "~/p.txt"` (no shell expands it) was an "unknown prompt set" until session 45."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.txt").write_text("a cat\n")
    assert prompts.load("~/p.txt") == ["a cat"]


def test_the_zoo_caption_set_goes_to_zoo_denoisers_whatever_their_folder_is_called(tmp_path):
    """It went by "fashion" in the pipeline's folder name until session 45: a zoo copy in `copy/` got the generic
    set, a non-zoo pipeline in `my-fashion-finetune/` the zoo's captions."""
    from diffusers import DiffusionPipeline

    from diffusion_accel import zoo
    from diffusion_accel.testing.tiny import build_tiny

    fashion = prompts.load("fashion", limit=2)
    zoo.load("fashion-sd").save_pretrained(tmp_path / "copy")
    build_tiny("sd").save_pretrained(tmp_path / "my-fashion-finetune")
    assert prompts.for_pipeline(DiffusionPipeline.from_pretrained(tmp_path / "copy"), limit=2) == fashion
    other = DiffusionPipeline.from_pretrained(tmp_path / "my-fashion-finetune")
    assert prompts.for_pipeline(other, limit=2) == prompts.load("default", limit=2)
    assert prompts.for_pipeline(zoo.load("fashion-flux"), limit=2) == fashion


def test_a_zoo_training_export_of_another_size_gets_the_zoo_captions():
    """Tagged with the zoo's call settings (`--arch large` exports load so), it runs no shipped denoiser config:
    the config test alone gave it the generic set (session 45's review)."""
    from diffusion_accel import zoo
    from diffusion_accel.pipeline_defaults import set_call_defaults
    from diffusion_accel.testing.tiny import build_tiny

    pipe = build_tiny("flux")
    assert prompts.for_pipeline(pipe, limit=2) == prompts.load("default", limit=2)
    set_call_defaults(pipe, zoo.CALL_DEFAULTS["fashion-flux"])
    assert prompts.for_pipeline(pipe, limit=2) == prompts.load("fashion", limit=2)


def test_a_prompt_file_breaks_lines_only_at_line_ends(tmp_path):
    """splitlines() also broke a prompt at U+2028, U+0085 or a form feed (session 47)."""
    file = tmp_path / "p.txt"
    file.write_bytes("a shirt\u2028with stripes\r\nb\x0cc\rd\n".encode("utf-8"))
    assert prompts.load(str(file)) == ["a shirt\u2028with stripes", "b\x0cc", "d"]


def test_an_absolute_prompt_path_string_reads_that_file_not_a_txt_beside_it(tmp_path):
    """"/data/captions" as a string was looked up as a bundled set: the join gave "/data/captions.txt", which was
    read instead, and a missing file was found through its .txt sibling (session 49)."""
    (tmp_path / "captions").write_text("from captions\n")
    (tmp_path / "captions.txt").write_text("from captions.txt\n")
    (tmp_path / "other.txt").write_text("only txt\n")
    assert prompts.load(str(tmp_path / "captions")) == ["from captions"]
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompts.load(str(tmp_path / "other"))
    assert prompts.load("fashion", limit=1) == prompts.load(Path(prompts.__file__).parent / "fashion.txt", limit=1)
