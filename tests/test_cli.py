"""The mmfuse command: init, info, generate with .npy and .safetensors items."""
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from mmfuse import MultimodalPipeline
from mmfuse.cli import main


def test_init_info_generate(qwen3_base, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["init", str(qwen3_base), str(out), "--modality", "m1:32", "--modality", "audio:8:linear"]) == 0
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "MMFuseQwen3ForCausalLM" in info
    assert "m1" in info and "audio" in info and f"{32 * 128 + 128 + 128 * 128 + 128:,}" in info  # mlp params

    a, b = np.random.rand(32).astype(np.float32), np.random.rand(3, 8).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    save_file({"m1": a, "audio": b}, str(tmp_path / "items.safetensors"))
    prompt = "Compare <|m1|> and <|audio|>"
    expected = MultimodalPipeline(out, backend="hf").generate(
        {"text": prompt, "multimodal_data": {"multimodal_embeddings": {"m1": [a], "audio": [b]}}}, max_tokens=8)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", prompt, "--embeddings", str(tmp_path / "items.safetensors"),
                 "--max-tokens", "8", "--backend", "hf"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    np.save(tmp_path / "b.npy", b)
    assert main(["generate", str(out), "--prompt", prompt, "--embeddings", f"m1={tmp_path / 'a.npy'}",
                 "--embeddings", f"audio={tmp_path / 'b.npy'}", "--max-tokens", "8", "--backend", "hf"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_errors_are_clean_and_pickles_refused(qwen3_ckpt, tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    r = subprocess.run([sys.executable, "-m", "mmfuse.cli", "generate", str(qwen3_ckpt), "--prompt", "<|m1|>",
                        "--embeddings", f"m1={tmp_path / 'obj.npy'}", "--backend", "hf"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "object arrays are refused" in r.stderr
    np.save(tmp_path / "bad.npy", np.ones(5, dtype=np.float32))
    r = subprocess.run([sys.executable, "-m", "mmfuse.cli", "generate", str(qwen3_ckpt), "--prompt", "<|m1|>",
                        "--embeddings", f"m1={tmp_path / 'bad.npy'}", "--backend", "hf"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "modality 'm1' item 0: wrong last dimension, expected 32" in r.stderr
