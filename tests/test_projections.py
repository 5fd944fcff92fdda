"""Fused projections (``raas_flex.fuse_projections``): the same model, fewer matrix products."""

from __future__ import annotations

import pytest
import torch

import raas_flex
from raas_flex.projections import GROUPS
from test_families import FAMILIES, compiled_generate, generate, prompts, tiny_model


def fused_linears(model):
    return [m for m in model.modules() if "_raas_flex_fused" in m.__dict__]


def expected_groups(model):
    return sum(all(type(getattr(m, n, None)) is torch.nn.Linear for n in names)
               for m in model.modules() for names in GROUPS)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phi3"])
def test_fused_model_generates_the_models_tokens(family, unpatch_everything):
    """Unpatched and patched (a budget that holds everything and one that evicts), the fused model
    gives the tokens and logits of the same model unfused."""
    model = tiny_model(family, seed=4)
    ids, mask = prompts([11, 6], seed=5)
    refs = [generate(model, ids, mask, 24)]
    raas_flex.patch(model, budget=64, page_size=16)
    refs.append(generate(model, ids, mask, 24))
    raas_flex.patch(model, budget=32, page_size=8)
    refs.append(generate(model, ids, mask, 24))
    raas_flex.unpatch(model)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    assert raas_flex.fuse_projections(model) is model
    groups = expected_groups(model)
    assert groups >= model.config.num_hidden_layers  # at least q/k/v in every layer
    assert len({id(m.__dict__["_raas_flex_fused"][0]) for m in fused_linears(model)}) == groups
    # the same modules and state_dict, every fused Parameter a view of its group's one tensor
    assert [n for n, _ in model.named_modules()] == modules
    sd = model.state_dict()
    assert sd.keys() == keys.keys() and all(torch.equal(sd[k], v) for k, v in keys.items())
    fused = {id(lin.__dict__["_raas_flex_fused"][0]): lin.raas_flex_fused_weight for lin in fused_linears(model)
             if lin.__dict__["_raas_flex_fused"][1] == 0}  # a group's first Linear holds its fused tensor
    for lin in fused_linears(model):
        group = fused[id(lin.__dict__["_raas_flex_fused"][0])]
        assert lin.weight.untyped_storage().data_ptr() == group.untyped_storage().data_ptr()
    outs = [generate(model, ids, mask, 24)]
    raas_flex.patch(model, budget=64, page_size=16)
    outs.append(generate(model, ids, mask, 24))
    raas_flex.patch(model, budget=32, page_size=8)
    outs.append(generate(model, ids, mask, 24))
    for out, ref in zip(outs, refs):
        assert torch.equal(out.sequences, ref.sequences)
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=1e-4)
    raas_flex.unpatch(model)
    raas_flex.unfuse_projections(model)
    assert not fused_linears(model) and not any("raas_flex" in n for n, _ in model.named_buffers())
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs)  # every Parameter its own storage again
    assert torch.equal(generate(model, ids, mask, 24).sequences, refs[0].sequences)


def test_fused_products_in_the_compiled_graph_and_no_recompile():
    """Compiled, a fused layer holds 4 products instead of 7 (q/k/v and gate/up one each), and a
    second call does not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_model("llama", seed=6)
    ids = torch.randint(5, 120, (2, 9))

    def products(m):
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        compiled = torch.compile(m, backend=backend, fullgraph=True)
        with torch.no_grad():
            out = compiled(ids).logits
        return out, sum(n.target is torch._C._nn.linear for g in graphs for n in g.graph.nodes)

    ref, separate = products(model)
    raas_flex.fuse_projections(model)
    out, fused = products(model)
    layers = model.config.num_hidden_layers
    assert separate == 7 * layers + 1 and fused == 4 * layers + 1  # + the LM head
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(ids).logits, ref, rtol=0, atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_fused_weights_follow_load_state_dict_and_refuse_gradients():
    model = tiny_model("qwen2", seed=7)  # q/k/v with biases
    raas_flex.fuse_projections(model)
    attn = model.model.layers[0].self_attn
    sd = model.state_dict()
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros_like(sd["model.layers.0.self_attn.k_proj.weight"])
    sd["model.layers.0.self_attn.k_proj.bias"] = torch.ones_like(sd["model.layers.0.self_attn.k_proj.bias"])
    model.load_state_dict(sd)
    x = torch.randn(1, 3, model.config.hidden_size)
    with torch.no_grad():
        q = attn.q_proj(x)
        k = attn.k_proj(x)  # the part the q product left: the loaded weights, through the views
        assert torch.equal(k, torch.ones_like(k))
        torch.testing.assert_close(q, x @ attn.q_proj.weight.T + attn.q_proj.bias)
        # another input, or a part asked for first: its own product, the same values
        assert torch.equal(attn.v_proj(x.clone()), torch.nn.functional.linear(x, attn.v_proj.weight, attn.v_proj.bias))
    with pytest.raises(RuntimeError, match="inference"):
        attn.q_proj(x)


def test_fuse_projections_refuses_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        raas_flex.fuse_projections("model")
    with pytest.raises(ValueError, match="no fusable projections"):
        raas_flex.fuse_projections(tiny_model("phi3"))  # its q/k/v and gate/up are fused already
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="nothing to unfuse"):
        raas_flex.unfuse_projections(model)
    raas_flex.fuse_projections(model)
    with pytest.raises(ValueError, match="already has fused projections"):
        raas_flex.fuse_projections(model)
    # a hooked Linear (accelerate's offloading sets an instance forward) is refused, and nothing changes
    model = tiny_model("llama")
    up = model.model.layers[1].mlp.up_proj
    up.forward = lambda x: torch.nn.functional.linear(x, up.weight)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj has a forward of its own"):
        raas_flex.fuse_projections(model)
    assert not fused_linears(model)
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_oss"])
def test_gpu_compiled_generate_with_fused_projections_is_the_model(family, unpatch_everything):
    """On CUDA, a patched and fused model's auto-compiled generate (CUDA graphs) gives the unpatched,
    unfused model's tokens and logits (fp32), and after a warm-up generation nothing compiles again."""
    model = tiny_model(family).cuda()
    ids, mask = prompts([12, 7], seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    ref = generate(model, ids, mask, 40, disable_compile=True)
    raas_flex.fuse_projections(model)
    raas_flex.patch(model, budget=64, page_size=16)
    out = compiled_generate(model, ids, mask, 40)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=1e-3)
