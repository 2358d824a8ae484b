"""What a run leaves about how it was made: provenance in the metrics, a saved model's pruning_config.json (which
``--config`` replays, bit for bit) and its model card; ``--config`` files in JSON and YAML, and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import CALIB, assert_one_line_error, prune_argv, read_metrics, run_main, tiny_opt  # noqa: F401


def _weights(model_dir):
    return load_file(model_dir / "model.safetensors")


def test_a_saved_model_carries_its_config_and_card_and_the_config_replays_the_run(tiny_opt, tmp_path, capsys):  # noqa: F811
    first, again = tmp_path / "first", tmp_path / "again"
    argv = prune_argv(tiny_opt, "--save", str(tmp_path / "s1"), "--save_model", str(first), kind="2:4")
    assert run_main(argv) == 0
    metrics = read_metrics(tmp_path / "s1")
    saved = json.loads((first / "pruning_config.json").read_text())
    assert saved["flags"]["sparsity_type"] == "2:4" and saved["prune_config"] == metrics["prune_config"]
    prov = metrics["provenance"]
    assert prov["argv"] == argv and prov["command"].startswith("wanda-prune --model ")
    assert prov["version"] and len(prov["calibration_ids_sha256"]) == 64 and prov["calibration_shape"] == [4, 64]
    from pruning.cli.provenance import file_sha256

    assert prov["calibration_file_sha256"] == file_sha256(str(CALIB))
    assert metrics["versions"]["wanda-kernels"] and "accelerate" in metrics["versions"]
    card = (first / "README.md").read_text()
    assert card.startswith("---\n") and "pruning-wanda" in card and "2-4" in card
    assert f"{metrics['ppl_test']:.4f}" in card and prov["calibration_ids_sha256"] in card  # results filled in
    assert (first / "pruning_config.json").stat().st_mode & 0o044 == 0o044  # readable like the weights

    replay = ["--config", str(first / "pruning_config.json"), "--save", str(tmp_path / "s2"), "--save_model",
              str(again)]  # fmt: skip
    assert run_main(replay) == 0
    replayed = read_metrics(tmp_path / "s2")
    assert replayed["ppl_test"] == metrics["ppl_test"] and replayed["prune_config"] == metrics["prune_config"]
    assert replayed["provenance"]["calibration_ids_sha256"] == prov["calibration_ids_sha256"]
    ours, theirs = _weights(first), _weights(again)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_command_line_flags_override_a_yaml_config(tiny_opt, tmp_path, capsys):  # noqa: F811
    argv = prune_argv(tiny_opt)
    flags = dict(zip(argv[0::2], argv[1::2], strict=True))
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{k.lstrip('-')}: {v}\n" for k, v in flags.items()) + "sparsity-type: '2:4'\n")
    assert run_main(["--config", str(config), "--sparsity_type", "4:8", "--save", str(tmp_path / "s")]) == 0
    used = read_metrics(tmp_path / "s")["prune_config"]
    assert used["sparsity_type"] == "4:8" and used["method"] == "wanda" and used["sparsity_ratio"] == 0.5
    assert run_main(["--config", str(config), "--save", str(tmp_path / "t")]) == 0
    assert read_metrics(tmp_path / "t")["prune_config"]["sparsity_type"] == "2:4"  # the dashed spelling too


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("bad.json", '{"prune_method": "wanda", "bogus": 1}', "unknown flag 'bogus'"),
        ("bad.yaml", "sparsity_ratio: abc\n", "sparsity_ratio must be float"),
        ("bad.json", "{not json", "is not valid json"),
        ("bad.json", "[1, 2]", "must hold a mapping"),
        ("bad.yaml", "prune_method: nope\n", "prune_method must be one of"),
        ("missing.json", None, "No such file"),
    ],
)
def test_a_bad_config_file_is_one_line(tmp_path, capsys, name, text, fragment):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert_one_line_error(capsys, run_main(["--config", str(path)]), fragment)


def test_push_to_hub_uploads_the_saved_model_last(tiny_opt, tmp_path, capsys, monkeypatch):  # noqa: F811
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model_dir = tmp_path / "model"
    argv = prune_argv(tiny_opt, "--save_model", str(model_dir), "--push_to_hub", "me/tiny-pruned")
    assert run_main(argv) == 0
    assert calls[0] == ("create", "me/tiny-pruned")
    assert calls[1][:2] == ("upload", "me/tiny-pruned") and {"README.md", "pruning_config.json"} <= set(calls[1][2])

    class Unreachable(FakeApi):
        def upload_folder(self, *args, **kwargs):
            raise ConnectionError("Max retries exceeded\nwith url")

    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    capsys.readouterr()
    other = tmp_path / "other"
    argv = prune_argv(tiny_opt, "--save_model", str(other), "--push_to_hub", "me/tiny-pruned")
    assert_one_line_error(capsys, run_main(argv), "--push_to_hub", "ConnectionError", str(other))
    assert (other / "model.safetensors").is_file()  # the failed push cost nothing


@pytest.mark.parametrize(
    "flags, env, fragment",
    [
        (["--push_to_hub", "me/x"], {}, "add --save_model"),
        (["--push_to_hub", "not a repo!", "--save_model", "SAVE"], {}, "not a Hub repo id"),
        (["--push_to_hub", "me/x", "--save_model", "SAVE"], {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE"),
    ],
)
def test_push_to_hub_problems_are_found_before_any_work(tiny_opt, tmp_path, capsys, monkeypatch, flags, env, fragment):  # noqa: F811
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    flags = [str(tmp_path / "m") if f == "SAVE" else f for f in flags]
    assert_one_line_error(capsys, run_main([*prune_argv(tiny_opt), *flags]), fragment)
    assert not (tmp_path / "m").exists()
