"""``mlx_kvq.server`` as a real server process on the embedded model (4-bit KV, the
defaults), driven by the ``openai`` client: chat, completion, streaming, stop words,
concurrent clients whose greedy outputs equal single runs, a prompt-cache hit, malformed
requests, a client that disconnects mid-stream, a request over the KV memory limit and a
prompt past the model's context. One server for the module (and a fresh one for a first
request)."""

import concurrent.futures as cf
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlx_kvq
import mlx.core as mx
from mlx_kvq.bridge import stream_generate

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
# every prompt is past the 4 sinks + 32-token window: the first decode step packs tokens
TAIL = (" grow near the old stone bridge where the miller's daughter walks each morning, counting "
        "the boats that pass on the wide river and the birds that sing in the tall green trees. One morning she saw")
WORDS = ["Apples", "Rivers", "Mountains", "Lanterns", "Violins", "Kites"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve():
    """A server process on a free port with the module's flags, once it answers /health:
    ``(port, proc)``."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_kvq.cli.server", "--port", str(port), "--max-tokens", "12",
         "--log-level", "WARNING", "--max-kv-memory", "48MB", "--prompt-concurrency", "3"],  # rows prefilled together
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    deadline = time.time() + 180
    while True:
        try:
            status, _ = _request(port, "GET", "/health")
            if status == 200:
                return port, proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server():
    port, proc = _serve()
    yield port, proc
    _stop(proc)


def _ctrl_c_as_in_a_terminal():
    """SIGINT's default in the server, as a terminal gives it: a shell that starts the tests
    in the background without job control (``nohup bash -c ... &``) hands them SIGINT ignored,
    which Python keeps, and the Ctrl-C test's server then never sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="none", max_retries=0, timeout=300)


def _request(port, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def alone(model_tok, tokens, max_tokens=12):
    """The text a request gets alone: ``stream_generate`` with a fresh 4-bit cache."""
    model, tokenizer = model_tok
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=4)
    return "".join(r.text for r in stream_generate(model, tokenizer, tokens, max_tokens=max_tokens,
                                                     prompt_cache=cache))


def test_chat_and_models(client):
    r = client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=10)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens > 30 and 0 < r.usage.completion_tokens <= 10
    # a seeded request is served alone (mlx-lm's stream_generate on our caches), from the prompt cache
    s = client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=10, seed=1)
    assert "Paris" in s.choices[0].message.content and s.usage.prompt_tokens_details.cached_tokens > 30
    assert "default_model" in [m.id for m in client.models.list().data]


def test_concurrent_clients_match_single_runs(client, fast_smollm):
    """6 clients at once (completions, streaming for half of them): all complete and each
    text equals the prompt's greedy run alone. The prompts share no first token, so no
    request is served from another's prompt cache."""
    prompts, N = [w + TAIL for w in WORDS], 8

    def ask(i):
        if i % 2:
            chunks = list(client.completions.create(model="default_model", prompt=prompts[i], max_tokens=N,
                                                    stream=True))
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model="default_model", prompt=prompts[i], max_tokens=N).choices[0].text

    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(ask, range(len(prompts))))
    tokenizer = fast_smollm[1]
    for p, text in zip(prompts, got):
        assert text and text == alone(fast_smollm, tokenizer.encode(p), N), p


def test_stop_words(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model="default_model", messages=messages, max_tokens=10)
    text = full.choices[0].message.content
    stop = " " + text.split()[3]  # "The capital of France is Paris." -> " France" (mlx-lm matches its tokens)
    r = client.chat.completions.create(model="default_model", messages=messages, max_tokens=10, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]


def test_prompt_cache_hit(client):
    """A conversation that comes back is not prefilled again."""
    messages = [{"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model="default_model", messages=messages, max_tokens=6)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And a vegetable?"}]
    second = client.chat.completions.create(model="default_model", messages=messages, max_tokens=6)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert second.choices[0].message.content


@pytest.mark.parametrize("body", [
    b"{not json",
    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -1},
    {"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"},
    {"messages": "Hi"},
    {"prompt": ""},
    {"prompt": "Hi", "stop": 5},
    {"max_tokens": 4},
    b'{"prompt": "Hi", "temperature": NaN}',
    {"prompt": "Hi", "temperature": 1e-39},
    {"prompt": "Hi", "top_p": 1e39},
    {"prompt": "Hi", "seed": -1},
    {"prompt": "Hi", "logit_bias": {"49152": -100}},
    {"prompt": "Hi", "logit_bias": {"-3": -100}},
    {"prompt": "Hi", "logit_bias": {"5": 1e39}},
    {"prompt": "Hi", "presence_penalty": -1e40},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "stream_options": 5},
    {"messages": [{"role": "user", "content": "Hi"}], "tools": 5},
    {"messages": [{"role": "user", "content": "Hi"}], "tools": [5]},
    {"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": 5},
    {"messages": [{"role": "user", "content": "Hi"}], "n": 2},
    {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]},
                  {"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "assistant", "tool_calls": [5]}, {"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "assistant", "tool_calls": 5}, {"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": -1},
    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": True},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"messages": [{"role": "user", "content": [5]}]},
    {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
], ids=["bad-json", "max-tokens", "temperature", "messages", "empty-prompt", "stop", "no-messages",
        "temperature-nan", "temperature-tiny", "top-p-inf", "seed", "bias-past-vocab", "bias-negative-id",
        "bias-inf", "presence-inf", "content", "stream-options", "tools", "tools-items", "template-kwargs", "n",
        "tool-call-arguments", "tool-call-not-object", "tool-calls-not-list", "top-logprobs", "max-tokens-bool",
        "text-part-without-text", "part-not-object", "audio-part"])
def test_malformed_requests_get_400_and_the_server_lives(server, client, body):
    port = server[0]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    path = "/v1/completions" if b'"prompt"' in raw else "/v1/chat/completions"
    status, out = _request(port, "POST", path, raw=raw)
    assert status == 400 and "error" in json.loads(out), (status, out)
    assert _request(port, "GET", "/health")[0] == 200


def test_an_image_for_a_text_only_model_is_refused_before_any_fetch(server, client):
    """The embedded model takes text only: an image part gets a 400 naming its type at once,
    the model loaded (this module's server) or not yet (a fresh server's first request);
    mlx-lm's handler fetches the URL first, here an address that never answers, for up to 30
    s. Text parts in a list are served."""
    image = {"type": "image_url", "image_url": {"url": "http://192.0.2.1/cat.png"}}  # TEST-NET-1
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]}
    fresh, proc = _serve()
    try:
        for port in (fresh, server[0]):
            t0 = time.time()
            status, out = _request(port, "POST", "/v1/chat/completions", body)
            assert status == 400 and "'image_url'" in json.loads(out)["error"], (status, out)
            assert time.time() - t0 < 10
    finally:
        _stop(proc)
    r = client.chat.completions.create(model="default_model", max_tokens=2, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "fruit."}]}])
    assert r.choices[0].message.content is not None


def test_sampling_parameters_at_their_limits_are_served(client):
    """The bounds above refuse only what would sample from NaN logits: the last token id,
    OpenAI's extreme biases and penalties and a tiny temperature are served."""
    r = client.chat.completions.create(model="default_model", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=1e-30, presence_penalty=-2, frequency_penalty=2,
                                       logit_bias={"49151": -100, "5": 100}, logprobs=True)
    tokens = r.choices[0].logprobs.content
    assert [t.id for t in tokens] == [5] * 3, tokens  # biased by 100
    assert all(math.isfinite(t.logprob) for t in tokens)


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default_model", prompt="Hi", max_tokens=0)
    assert client.completions.create(model="default_model", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_a_model_that_cannot_load_leaves_the_served_model(server, client, tmp_path, smollm_path):
    """A request naming a model that is not there, or whose files do not load, gets the
    error; the next requests are served by the same model (this module's server runs under
    --max-kv-memory, whose admission loads a request's model to size it)."""
    port = server[0]
    hi = dict(model="default_model", messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=4)
    before = client.chat.completions.create(**hi).choices[0].message.content
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights
    for body, said in [(dict(model=str(tmp_path / "missing")), "model path not found"),
                       (dict(model=str(broken)), "safetensors"),
                       (dict(model=str(smollm_path), adapters=str(tmp_path)), "apply to mlx-lm models")]:
        status, out = _request(port, "POST", "/v1/chat/completions", dict(hi, **body))
        assert status == 404 and said in json.loads(out)["error"], (status, out)
        assert client.chat.completions.create(**hi).choices[0].message.content == before


def test_a_request_for_another_model_is_served_after_the_running_ones(server, client, smollm_path, tmp_path):
    """Under --max-kv-memory a request naming another model (here the embedded GGUF under a
    second name) waits for the running request, is served by that model, and the next
    request by the default model again: each greedy text equals the default model's own."""
    other = tmp_path / "other.gguf"
    other.symlink_to(smollm_path)
    ask = lambda model, n: client.completions.create(model=model, prompt="Once upon a time", max_tokens=n,
                                                     temperature=0.0).choices[0].text
    alone = ask("default_model", 24)
    with cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, "default_model", 24)
        time.sleep(0.5)  # the first request is running when the other model's arrives
        second = pool.submit(ask, str(other), 24)
        assert first.result() == alone and second.result() == alone
    assert ask("default_model", 24) == alone


def test_request_over_the_kv_memory_limit_is_refused_and_the_server_lives(server, client):
    """The module's server runs with --max-kv-memory 48MB (every test here is admitted under
    it): a request whose max_tokens runs to the end of the model's 8192-token context (54.5 MB
    of this model's 4-bit KV with its float32 sinks and window) is refused with a 400."""
    port = server[0]
    status, out = _request(port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 10**6})
    assert status == 400 and "--max-kv-memory" in json.loads(out)["error"], (status, out)
    assert client.completions.create(model="default_model", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_a_prompt_past_the_models_context_is_refused_and_the_server_lives(server, client):
    """A prompt of more tokens than the model's context (8192 for SmolLM2) gets a 400 naming
    both lengths before any prefill, which the openai client raises as BadRequestError."""
    port = server[0]
    long_prompt = "The river runs past the mill. " * 1400
    status, out = _request(port, "POST", "/v1/completions", {"prompt": long_prompt, "max_tokens": 4})
    error = json.loads(out)["error"]
    assert status == 400 and "tokens; the model's context is 8192 tokens" in error, (status, out)
    assert int(error.split("takes ")[1].split()[0]) > 8192
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default_model", messages=[{"role": "user", "content": long_prompt}],
                                       max_tokens=4)
    assert "context is 8192" in e.value.response.text
    assert client.completions.create(model="default_model", prompt="Hi", max_tokens=2).choices[0].text is not None


def _cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the server's CPU time from /proc")
def test_disconnected_client_frees_its_row(server, client):
    """A streaming client that goes away mid-stream: its row leaves the batch, so the
    server stops computing (its CPU time nearly stops: within 1 s on a 2-core CPU, 2.5 s on an
    H100; ``benchmarks/lab/server_disconnect_cpu.py``), at the latest half the time the rest of
    the request's 2000 tokens would take at the rate it streamed, and keeps serving."""
    port, proc = server
    body = json.dumps({"prompt": "Count to a thousand:", "max_tokens": 2000, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    stream = sock.makefile("rb")
    assert b" 200 " in stream.readline()
    while not stream.readline().startswith(b"data:"):
        pass
    t0, c0, events = time.time(), _cpu_seconds(proc.pid), 1
    while time.time() - t0 < 2:
        line = stream.readline()
        assert line  # still streaming
        events += line.startswith(b"data:")
    busy = (_cpu_seconds(proc.pid) - c0) / (time.time() - t0)
    rate = (events - 1) / (time.time() - t0)  # tokens a second, about: one event each
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    wait = min(10.0, (2000 - events) / rate / 2)  # at most half what the rest of the request would take
    left = time.time() + wait
    while True:
        t0, c0 = time.time(), _cpu_seconds(proc.pid)
        time.sleep(0.5)
        idle = (_cpu_seconds(proc.pid) - c0) / (time.time() - t0)
        if idle < 0.5 * busy:
            break
        assert time.time() < left, f"still computing {wait:.1f} s after the client left ({idle:.2f} of {busy:.2f} cores)"
    r = client.completions.create(model="default_model", prompt="Hello", max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_interrupt_stops_the_server_cleanly(server):
    """Ctrl-C after requests: mlx-lm's shutdown, exit status 0, no abort (the generation
    thread's compile cache freed while the interpreter finalized aborted the process).
    It stops the module's server: the last test to use it."""
    port, proc = server
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(60)
    except subprocess.TimeoutExpired:  # where its threads are: the server dumps them on SIGUSR1
        proc.send_signal(signal.SIGUSR1)
        time.sleep(3)
        proc.kill()
        pytest.fail(f"the server did not stop within 60 s of SIGINT; its threads:\n{proc.stderr.read()[-6000:]}")
    err = proc.stderr.read()
    assert rc == 0 and "terminate called" not in err, (rc, err[-2000:])


def test_flags_are_mlx_lms_plus_the_kv_flags():
    from mlx_kvq.cli.args import cache_kwargs
    from mlx_kvq.cli.server import main, setup_arg_parser

    args = setup_arg_parser().parse_args(["--decode-concurrency", "4", "--prompt-cache-bytes", "1GB"])
    assert (args.decode_concurrency, args.prompt_cache_bytes, args.max_tokens) == (4, 10**9, 512)
    kv = cache_kwargs(args)  # the KV flags default to None; the defaults are mlx_kvq.generate's
    assert (kv["kv_bits"], kv["kv_group_size"], kv["quantized_kv_start"], args.model) == (4, None, 0, None)
    with pytest.raises(SystemExit, match="Unsupported key bits 7"):
        main(["--kv-bits", "7"])
    for size, n in (("100", 100), ("512M", 512 * 10**6), ("2GiB", 2 << 30), ("0", 0)):  # mlx-lm's forms, and ours
        assert setup_arg_parser().parse_args(["--prompt-cache-bytes", size]).prompt_cache_bytes == n


@pytest.mark.parametrize("argv, named", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: model path not found"),
    (["--draft-model", "/nonexistent/draft"], "--draft-model /nonexistent/draft: model path not found"),
    (["--adapter-path", "/nonexistent/adapters"], "--adapter-path /nonexistent/adapters: not found"),
    (["--adapter-path", "."], "apply to mlx-lm models"),  # the embedded GGUF model
    (["--host", "999.1.1.1"], "cannot listen on --host 999.1.1.1"),
    (["--chat-template-args", "[1]"], "argument --chat-template-args: expected a JSON object"),
])
def test_what_mlx_lms_server_finds_after_it_starts_stops_it_at_start(argv, named, capsys):
    """mlx-lm's server starts with these and then fails in its generation thread (every
    request gets the error) or with a traceback."""
    from mlx_kvq.cli.server import main

    with pytest.raises(SystemExit) as e:
        main(argv + ["--port", "0"])
    said = str(e.value.code) + capsys.readouterr().err
    assert named in said and "Traceback" not in said, said


def test_a_port_in_use_stops_the_server_at_start():
    from mlx_kvq.cli.server import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(SystemExit, match=f"cannot listen on --host 127.0.0.1 --port {s.getsockname()[1]}"):
            main(["--port", str(s.getsockname()[1])])


@pytest.mark.parametrize("value", ["abc", "-5", "-5GB", "1e3"])
def test_a_bad_prompt_cache_bytes_is_named_at_start(value, capsys):
    """mlx-lm's parser of --prompt-cache-bytes raises a traceback (decimal's
    InvalidOperation, a KeyError) for these."""
    from mlx_kvq.cli.server import setup_arg_parser

    with pytest.raises(SystemExit):
        setup_arg_parser().parse_args([f"--prompt-cache-bytes={value}"])
    err = capsys.readouterr().err
    assert "argument --prompt-cache-bytes:" in err and repr(value) in err and "Traceback" not in err, err


def test_prompt_concurrency_defaults_to_the_devices():
    """mlx-lm's 8 prompts prefilled together on GPUs, one at a time on the CPU; a flag wins."""
    from mlx_kvq.cli.server import device_defaults, setup_arg_parser

    previous = mx.default_device()
    try:
        for device, n in [(mx.cpu, 1), (mx.gpu, 8)]:
            if device == mx.gpu and not mx.is_available(mx.gpu):
                continue
            mx.set_default_device(device)
            assert device_defaults(setup_arg_parser().parse_args([])).prompt_concurrency == n
            assert device_defaults(setup_arg_parser().parse_args(["--prompt-concurrency", "5"])).prompt_concurrency == 5
    finally:
        mx.set_default_device(previous)


@pytest.mark.parametrize("flag", ["--prefill-step-size=0", "--prompt-concurrency=0", "--decode-concurrency=0",
                                  "--max-tokens=0", "--port=99999", "--temp=-1", "--temp=nan", "--top-p=5",
                                  "--min-p=-0.1", "--top-k=-2", "--prompt-cache-size=-1"])
def test_out_of_range_flags_stop_at_start(flag, capsys):
    """mlx-lm's numeric flags out of range: with mlx-lm's parser the server starts and then
    hangs its requests (a prefill step or prompt concurrency of 0) or fails each of them."""
    from mlx_kvq.cli.server import setup_arg_parser

    name, value = flag.split("=")
    with pytest.raises(SystemExit):
        setup_arg_parser().parse_args([flag])
    err = capsys.readouterr().err
    assert f"argument {name}: must be" in err and f"got {value}" in err, err
