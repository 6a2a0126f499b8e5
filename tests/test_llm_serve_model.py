"""The real SmolLM2-135M-Instruct behind ``tokenwire llm serve``, behind the daemon's ``openai`` upstream, streamed
to the SDK: a greedy answer is exactly what ``model.generate`` gives for the same chat-templated prompt."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tokenwire.daemon.config import parse_config  # noqa: E402
from tokenwire.daemon.llm_server import Engine, LLMService, load_engine, start_server  # noqa: E402
from tokenwire.daemon.service import Daemon  # noqa: E402
from tokenwire.transport.client import connect  # noqa: E402

from .test_loopback import run  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow]
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
TOKENS = 24


@pytest.fixture(scope="module")
def smol() -> Engine:
    from tokenwire.transport.cachegen.smollm import ModelUnavailable

    torch.set_num_threads(1)
    try:
        return load_engine(max_tokens=64)
    except ModelUnavailable as exc:
        pytest.skip(str(exc))


def test_a_greedy_answer_through_the_daemon_is_what_generate_gives(smol):
    model = smol.lm.model  # type: ignore[attr-defined]  # (a TorchLM)
    prompt = smol.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)  # (transformers 5: a BatchEncoding)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=TOKENS, do_sample=False)
    expected = smol.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)

    async def go() -> tuple[str, str | None]:
        service = LLMService(smol, 2, "smollm2")
        runner, port = await start_server(service, "127.0.0.1", 0)
        daemon = Daemon(parse_config({
            "server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
            "upstreams": [{"name": "smol", "type": "openai", "base_url": f"http://127.0.0.1:{port}/v1"}],
            "routes": [{"model": "*", "upstream": "smol"}]}))
        await daemon.start()
        try:
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
                stream = conn.chat(MESSAGES, max_tokens=TOKENS, params={"temperature": 0})
                text = "".join([delta async for delta in stream])
                return text, stream.stats.finish_reason if stream.stats else None
        finally:
            await daemon.stop()
            await runner.cleanup()
            service.close()

    text, reason = run(go(), 60)
    assert len(expected) > 20 and text == expected, (text, expected)
    assert reason == ("length" if len(out[0]) - len(prompt) == TOKENS else "stop")


def test_a_seeded_sampled_answer_repeats(smol):
    """temperature and top_p sample from a generator seeded with ``seed``: the same seed, the same answer."""
    import threading

    from tokenwire.daemon.llm_server import ChatParams

    def answer(seed: int) -> str:
        pieces: list[str] = []
        params = ChatParams(messages=MESSAGES, max_tokens=12, temperature=1.5, top_p=0.95, seed=seed)
        smol.run(params, pieces.append, threading.Event())
        return "".join(pieces)

    first = answer(7)
    assert answer(7) == first and len(first) > 10
