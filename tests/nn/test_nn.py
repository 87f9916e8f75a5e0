"""Building blocks: covariate injection is a linear layer on concatenated one-hots."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pyrovi.nn import AmortizedEncoder, CovariateLinear, Dispersion, ExpressionDecoder, FCLayers
from pyrovi.nn.fc import Dropout


def test_covariate_linear_equals_linear_on_concatenated_one_hots():
    torch.manual_seed(0)
    layer = CovariateLinear(7, 5, n_cat_list=[3, 1, 4], n_cont=2)
    x = torch.randn(11, 7)
    cats = [torch.randint(3, (11,)), torch.zeros(11, dtype=torch.long), torch.randint(4, (11,))]
    cont = torch.randn(11, 2)
    # The single-category covariate carries no information and has no weights.
    weight = torch.cat(
        [layer.linear.weight, layer.cat_weights[0].weight.T, layer.cat_weights[2].weight.T,
         layer.cont_weight.weight], dim=1,
    )
    concatenated = torch.cat([x, F.one_hot(cats[0], 3), F.one_hot(cats[2], 4), cont], dim=1)
    expected = concatenated.float() @ weight.T + layer.linear.bias
    torch.testing.assert_close(layer(x, cats, cont), expected)


def test_fc_layers_inject_covariates_into_every_layer_only_when_asked():
    deep = FCLayers(10, 4, n_cat_list=[3], n_layers=3, n_hidden=8, inject_covariates=True)
    shallow = FCLayers(10, 4, n_cat_list=[3], n_layers=3, n_hidden=8, inject_covariates=False)
    assert all(len(layer["linear"].cat_weights) == 1 for layer in deep.layers)
    assert [len(layer["linear"].cat_weights) for layer in shallow.layers] == [1, 0, 0]
    deep.eval()
    x = torch.randn(6, 10)
    out0 = deep(x, [torch.zeros(6, dtype=torch.long)])
    out1 = deep(x, [torch.full((6,), 2)])
    assert out0.shape == (6, 4) and not torch.allclose(out0, out1)


def test_dropout_keeps_each_unit_with_probability_one_minus_p_and_rescales():
    torch.manual_seed(0)
    dropout = Dropout(p=0.3)
    x = torch.ones(400, 500, requires_grad=True)
    out = dropout(x)
    kept = out != 0
    # 200,000 Bernoulli(0.7) draws: the share kept is within 5 standard errors of 0.7.
    assert abs(kept.float().mean().item() - 0.7) < 5 * (0.7 * 0.3 / kept.numel()) ** 0.5
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.7))
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())  # the gradient goes through the kept units
    # A fresh mask at every call, none in evaluation, and the FCLayers' dropout is this one.
    assert not torch.equal(dropout(x) != 0, kept)
    assert torch.equal(dropout.eval()(x), x)
    assert any(isinstance(m, Dropout) for m in FCLayers(4, 3, dropout_rate=0.1).modules())


def test_encoder_outputs_and_logistic_normal_transform():
    encoder = AmortizedEncoder(20, 4, latent_library=True, latent_distribution="ln").eval()
    q = encoder(torch.rand(5, 20))
    assert q.z_loc.shape == (5, 4) and q.library_loc.shape == (5, 1)
    assert (q.z_scale > 0).all() and (q.library_scale > 0).all()
    simplex = encoder.transform(torch.randn(5, 4))
    torch.testing.assert_close(simplex.sum(-1), torch.ones(5))
    assert AmortizedEncoder(20, 4).library_encoder is None


def test_decoder_heads_and_dispersion_modes():
    decoder = ExpressionDecoder(4, 30, n_cat_list=[2], predict_dispersion=True,
                                zero_inflation=True).eval()
    out = decoder(torch.randn(3, 4), [torch.tensor([0, 1, 1])])
    torch.testing.assert_close(out.rho.sum(-1), torch.ones(3))
    assert out.theta_logits.shape == (3, 30) and out.zi_logits.shape == (3, 30)
    batch = torch.tensor([0, 1, 1])
    assert Dispersion(30, "gene")(batch).shape == (30,)
    by_batch = Dispersion(30, "gene-batch", n_batch=2)(batch)
    assert by_batch.shape == (3, 30) and torch.equal(by_batch[1], by_batch[2])
    assert Dispersion(30, "gene-label", n_labels=4)(labels=torch.tensor([3])).shape == (1, 30)
    torch.testing.assert_close(Dispersion(30, "gene-cell")(theta_logits=out.theta_logits),
                               out.theta_logits.exp())
    assert Dispersion(5, "protein-batch", n_batch=2).mode == "gene-batch"


def test_fc_layers_broadcast_codes_against_cells():
    """Codes of shape (K, 1) meet every row of x (n, d): the (K, n, out) result equals the
    stack applied to each (row, code) pair, batch norm included (its rows are the pairs)."""
    torch.manual_seed(0)
    block = FCLayers(5, 7, n_cat_list=[3], n_layers=2, n_hidden=6, dropout_rate=0.0)
    x = torch.randn(4, 5)
    codes = torch.arange(3).unsqueeze(-1)
    broadcast = block(x, [codes])
    assert broadcast.shape == (3, 4, 7)
    pairs = block(x.repeat(3, 1), [codes.repeat_interleave(4)])  # the 12 pairs as rows
    torch.testing.assert_close(broadcast.reshape(12, 7), pairs)
    block.eval()
    torch.testing.assert_close(block(x, [codes])[2], block(x, [torch.full((4,), 2)]))


def test_gene_label_dispersion_takes_labels_of_any_shape():
    dispersion = Dispersion(5, "gene-label", n_labels=3)
    labels = torch.arange(3).unsqueeze(-1)  # an enumerated label, (K, 1)
    theta = dispersion(labels=labels)
    assert theta.shape == (3, 1, 5)
    torch.testing.assert_close(theta[:, 0], dispersion(labels=torch.arange(3)))
