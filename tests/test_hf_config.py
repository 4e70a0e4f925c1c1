"""--model as a Hugging Face config.json: dense Llama, Mistral, Qwen2, Qwen3 shapes; MoE refused."""
import json

import pytest

from offloadlab.catalog import get_model
from offloadlab.apps.cli import main
from offloadlab.errors import ConfigError
from offloadlab.hf_config import model_from_arg, model_from_hf_config

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256}
QWEN2_7B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
            "max_position_embeddings": 32768, "num_attention_heads": 28, "num_hidden_layers": 28,
            "num_key_value_heads": 4, "sliding_window": 131072, "use_sliding_window": False,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 152064}
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "head_dim": 128, "hidden_size": 4096, "intermediate_size": 12288,
            "max_position_embeddings": 40960, "num_attention_heads": 32, "num_hidden_layers": 36,
            "num_key_value_heads": 8, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 151936}
QWEN3_06B = {**QWEN3_8B, "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
             "num_hidden_layers": 28, "tie_word_embeddings": True}
MISTRAL_7B_V03 = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                  "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
                  "num_key_value_heads": 8, "sliding_window": None, "torch_dtype": "bfloat16", "vocab_size": 32768}
MIXTRAL = {**MISTRAL_7B_V03, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8,
           "num_experts_per_tok": 2}


def write(tmp_path, cfg, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("cfg,params", [
    (LLAMA_8B, 8_030_261_248),  # the published parameter counts of each checkpoint
    (QWEN2_7B, 7_615_616_512),  # q/k/v biases included
    (QWEN3_8B, 8_190_735_360),  # q/k norms included
    (QWEN3_06B, 596_049_920),  # tied embeddings, q width (2048) != hidden (1024)
    (MISTRAL_7B_V03, 7_248_023_552),
])
def test_parameter_counts_match_the_checkpoints(tmp_path, cfg, params):
    m = model_from_hf_config(write(tmp_path, cfg))
    assert m.params == params


def test_llama_config_is_the_catalog_shape(tmp_path):
    m = model_from_arg(str(write(tmp_path, LLAMA_8B) / "config.json"))
    ref = get_model("llama-3.1-8b")
    assert (m.layer_bytes, m.kv_bytes_per_token, m.weight_total_bytes) == (ref.layer_bytes, ref.kv_bytes_per_token,
                                                                           ref.weight_total_bytes)


def test_shapes_carry_bias_and_norms(tmp_path):
    q2 = model_from_hf_config(write(tmp_path, QWEN2_7B, "q2"))
    q3 = model_from_hf_config(write(tmp_path, QWEN3_06B, "q3"))
    assert ("self_attn.qkv_proj.bias", (28 * 128 + 2 * 4 * 128,)) in q2.layer_param_shapes
    assert ("self_attn.q_norm.weight", (128,)) in q3.layer_param_shapes and q3.tied_embeddings
    assert dict(q3.layer_param_shapes)["self_attn.o_proj.weight"] == (1024, 2048)
    assert q2.max_context == 32768


@pytest.mark.parametrize("cfg,needle", [
    (MIXTRAL, "num_local_experts=8"),
    ({**LLAMA_8B, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128}, "num_experts=128"),
    ({**MISTRAL_7B_V03, "sliding_window": 4096}, "sliding_window=4096"),
    ({**LLAMA_8B, "architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({k: v for k, v in LLAMA_8B.items() if k != "hidden_size"}, "hidden_size"),
    ({**LLAMA_8B, "quantization_config": {"quant_method": "awq"}}, "awq"),
])
def test_unmodelled_configs_are_one_line_errors(tmp_path, capsys, cfg, needle):
    d = write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=needle):
        model_from_hf_config(d)
    assert main(["memory", "--model", str(d), "--gpu", "h100"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_cli_serves_a_config_json_model(tmp_path, capsys):
    d = write(tmp_path, QWEN3_8B, "Qwen3-8B")
    wl = tmp_path / "w.csv"
    wl.write_text("prompt_len,output_len\n500,20\n800,30\n")
    assert main(["run", "--model", str(d), "--gpu", "h100", "--policy", "interval:4", "--workload", str(wl),
                 "--json", str(tmp_path / "r.json")]) == 0
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["model"] == "qwen3-8b" and row["requests"] == 2 and row["offloaded_layers"] == 9  # 36 layers / 4
