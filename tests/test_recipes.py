"""Every shipped recipe validates (paths unchecked: outputs of earlier stages may not exist yet);
every accelerate config parses with accelerate's own loader and says what it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.cli import _validate

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.relative_to(ROOT / "recipes").parts)
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_validates(path, capsys):
    _validate([str(path)], check_paths=False)
    assert capsys.readouterr().out.strip().endswith(f"{path}: ok")


EXPECTED = {  # file: (distributed type, processes, zero stage or None, optimizer offload)
    "cpu_single.yaml": ("NO", 1, None, None),
    "cpu_zero2.yaml": ("DEEPSPEED", 2, 2, "none"),
    "cpu_zero3.yaml": ("DEEPSPEED", 2, 3, "none"),
    "gpu6_zero3.yaml": ("DEEPSPEED", 6, 3, "none"),  # PPO: the other 2 GPUs of the node serve vLLM
    "gpu8_zero3.yaml": ("DEEPSPEED", 8, 3, "none"),
    "gpu8_zero3_offload.yaml": ("DEEPSPEED", 8, 3, "cpu"),
    "multinode_zero3.yaml": ("DEEPSPEED", 16, 3, "none"),
    "multinode_ppo_zero3.yaml": ("DEEPSPEED", 12, 3, "none"),  # 2 nodes x 6 training GPUs
}


def test_accelerate_configs_are_all_known():
    assert sorted(p.name for p in ACCELERATE) == sorted(EXPECTED)


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    kind, processes, stage, offload = EXPECTED[path.name]
    assert config.distributed_type.value == kind and config.num_processes == processes
    ds = config.deepspeed_config or {}
    assert ds.get("zero_stage") == stage and ds.get("offload_optimizer_device") == offload
    if stage == 3:
        assert ds["zero3_save_16bit_model"] is True
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds  # left to the trainer ("auto")
    if path.name.startswith("cpu_zero"):
        assert not config.use_cpu  # Accelerator(cpu=True) would drop the DeepSpeed plugin
    if path.name.startswith("multinode_"):
        assert config.num_machines == 2 and config.main_process_ip and ds["deepspeed_multinode_launcher"] == "standard"
