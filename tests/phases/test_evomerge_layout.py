"""Layer layouts: frankenmerge equals mergekit's passthrough over slices (run through mergekit
itself on Llama checkpoints), DFS paths compose layers as the indicator bits say, layout genes
survive variation, and bad layouts are typed errors."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from phases.evomerge.evolution import Evolution, EvolutionConfig, identity_layout, parent_genome
from phases.evomerge.genome import crossover, mutate, random_genome
from phases.evomerge.layout import dfs_merge, frankenmerge, layer_indices, layout_config, path_from_bits
from phases.evomerge.errors import MergeError


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    dirs = []
    for i in range(2):
        torch.manual_seed(i)
        LlamaForCausalLM(cfg).save_pretrained(root / f"m{i}")
        dirs.append(root / f"m{i}")
    return root, dirs


def test_frankenmerge_equals_mergekit_passthrough_slices(llamas):
    import json

    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    root, dirs = llamas
    slices = [(0, 0, 3), (1, 1, 4), (0, 2, 3)]
    conf = {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": str(dirs[m]), "layer_range": [a, b]}]} for m, a, b in slices]}
    run_merge(MergeConfiguration.model_validate(conf), str(root / "out"),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False))
    theirs = load_file(str(root / "out" / "model.safetensors"))
    ours = frankenmerge([load_file(str(d / "model.safetensors")) for d in dirs], slices)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    config = json.loads((root / "out" / "config.json").read_text())
    mine = layout_config(json.loads((dirs[0] / "config.json").read_text()), 4, len(layer_indices(ours)))
    assert mine["num_hidden_layers"] == config["num_hidden_layers"] == 7


def test_dfs_path_takes_each_hop_from_its_source_and_the_rest_from_one_model(llamas):
    _, dirs = llamas
    a, b = (load_file(str(d / "model.safetensors")) for d in dirs)
    path = [(1, 0), (0, 3), (0, 3), (1, 2)]  # a layer may repeat
    out = dfs_merge([a, b], path, rest_from=1)
    assert layer_indices(out) == [0, 1, 2, 3]
    for k, (src, layer) in enumerate(path):
        name = "mlp.down_proj.weight"
        assert torch.equal(out[f"model.layers.{k}.{name}"], (a, b)[src][f"model.layers.{layer}.{name}"])
    assert torch.equal(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])


def test_bits_give_the_path_in_sequential_order():
    # 2 sources x 3 layers x 2 repeats: slots (0,0)(0,1)(0,2)(1,0)(1,1)(1,2) then again
    bits = [1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert path_from_bits(bits, 2, 3) == [(0, 0), (0, 2), (1, 1), (1, 2)]
    with pytest.raises(MergeError):
        path_from_bits(bits[:-1], 2, 3)


@pytest.mark.parametrize("bad", [[], [(0, 9)], [(5, 0)]])
def test_bad_layouts_are_typed_errors(llamas, bad):
    _, dirs = llamas
    a = load_file(str(dirs[0] / "model.safetensors"))
    with pytest.raises(MergeError):
        dfs_merge([a], bad)
    with pytest.raises(MergeError):
        frankenmerge([a], [(0, 2, 2)])


def test_layout_genes_survive_variation_and_never_go_empty():
    rng = random.Random(0)
    ident = identity_layout(3, 2, 2)
    assert len(ident) == 2 * 4 * 2 and sum(ident) == 2 and path_from_bits(ident, 4, 2) == [(0, 0), (0, 1)]
    pop = [random_genome(rng, 3, 2, layout=ident) for _ in range(20)]
    assert any(g.layout != ident for g in pop), "random genomes explore layouts"
    for _ in range(300):
        child = mutate(rng, crossover(rng, rng.choice(pop), rng.choice(pop)), rate=0.5)
        assert len(child.layout) == len(ident) and any(child.layout)
    assert parent_genome(1, 3, 2, layout=ident).layout == ident


def test_evolution_with_layouts_starts_from_the_identity():
    evo = Evolution(EvolutionConfig(population=6, groups=2, dfs_repeats=2), n_models=3, seed=0, layers=2)
    pop = evo.initial()
    assert all(g.layout and len(g.layout) == 16 for g in pop)
    assert pop[0].layout == evo.identity
    with pytest.raises(ValueError):
        Evolution(EvolutionConfig(dfs_repeats=1), n_models=3, seed=0)
