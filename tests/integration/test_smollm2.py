"""A short chat SFT on the real pretrained SmolLM2-135M-Instruct, served offline."""

from __future__ import annotations

import numpy as np
import pytest
from tinker import types

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

CHATS = [
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Name the largest planet in our solar system.", "The largest planet is Jupiter."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do bees make?", "Bees make honey."),
    ("Which gas do plants take in?", "Plants take in carbon dioxide."),
]

pytestmark = pytest.mark.slow


def chat_datum(tok, question: str, answer: str) -> types.Datum:
    prompt = tok.apply_chat_template([{"role": "user", "content": question}],
                                     add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    full = prompt + tok.encode(answer + "<|im_end|>")
    weights = np.array([0.0] * (len(prompt) - 1) + [1.0] * (len(full) - len(prompt)),
                       dtype=np.float32)
    return types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": np.array(full[1:], dtype=np.int64), "weights": weights},
    )


def test_sft_lowers_loss_and_samples_text(service_client, capsys):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=8, seed=0).result()
    tok = tc.get_tokenizer()
    assert tok.encode("Hello world") == [19556, 905]
    data = [chat_datum(tok, q, a) for q, a in CHATS]
    n_tokens = sum(float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in data)
    losses = []
    for _ in range(6):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-3))
        losses.append(fb.result().metrics["loss:sum"] / n_tokens)
        opt.result()
    with capsys.disabled():  # shown in the CI log, not only on failure
        print("\nSmolLM2 SFT per-token loss:", [round(x, 3) for x in losses])
    assert losses[-1] < 0.7 * losses[0]

    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What do bees make?"}],
                                     add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    res = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=24, temperature=0.0)).result()
    seq = res.sequences[0]
    text = tok.decode(seq.tokens, skip_special_tokens=True)
    with capsys.disabled():
        print("SmolLM2 after SFT, 'What do bees make?' ->", repr(text), f"({seq.stop_reason})")
    assert text.strip()
    if seq.stop_reason == "stop":
        assert seq.tokens[-1] == tok.convert_tokens_to_ids("<|im_end|>")
