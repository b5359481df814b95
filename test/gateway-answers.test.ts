// Answers the contract promises with no test before issue 16: QUEUE_TIMEOUT_MS over HTTP (native,
// diffusion and OpenAI formats, across replicas), the catalogue routes' content, an image dying
// mid-body, and 502/504 in OpenAI's envelope and the diffusion format.
import t from 'tap'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { startFleet } from './helpers/gateway.js'

async function post (url: string, body: unknown): Promise<{ status: number, headers: Headers, body: any, ms: number }> {
  const started = performance.now()
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
  const text = await res.text()
  let parsed: unknown = text
  try { parsed = JSON.parse(text) } catch {}
  return { status: res.status, headers: res.headers, body: parsed, ms: performance.now() - started }
}

/** The catalogue comes from a background poll of the upstreams (UPSTREAM_POLL_MS): asked to poll often. */
const FAST_POLL = { UPSTREAM_POLL_MS: 200 }

/** Polls a GET until `ok` holds (the catalogue may come from a background poll): generous 5 s bound. */
async function eventually (url: string, ok: (status: number, body: any) => boolean): Promise<{ status: number, body: any }> {
  const deadline = performance.now() + 5000
  for (;;) {
    const res = await fetch(url)
    const text = await res.text()
    let body: unknown = text
    try { body = JSON.parse(text) } catch {}
    if (ok(res.status, body) || performance.now() > deadline) return { status: res.status, body }
    await sleep(50)
  }
}

t.test('QUEUE_TIMEOUT_MS: 503 with Retry-After, in each route\'s format, while another replica holds the GPUs', async (t) => {
  const QUEUE_TIMEOUT = 300
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'm', gpus: [0], simulator: { tokens: 200, tokenDelayMs: 20 } },
      { model: 'sd', kind: 'diffusor', gpus: [1], simulator: { imageDelayMs: 2000 } }
    ],
    options: { QUEUE_TIMEOUT_MS: QUEUE_TIMEOUT }
  })
  const a = await fleet.replica()
  const b = await fleet.replica()
  const holder = new AbortController()
  const stream = await fetch(`${a.url}/api/generate`, { method: 'POST', body: '{"model":"m","prompt":"hold"}', signal: holder.signal })
  await stream.body!.getReader().read()
  const image = post(`${a.url}/txt2img`, { model: 'sd', prompt: 'hold' })
  for (const deadline = performance.now() + 3000; (await fleet.heldGpus()).length < 2 && performance.now() < deadline;) await sleep(20)
  t.same(await fleet.heldGpus(), [...fleet.gpuIds].sort(), 'replica A holds both GPUs')

  const native = await post(`${b.url}/api/generate`, { model: 'm', prompt: 'x', stream: false })
  t.equal(native.status, 503)
  t.ok(Number(native.headers.get('retry-after')) > 0, `Retry-After ${native.headers.get('retry-after')}`)
  t.match(native.body, { error: String })
  t.notOk('detail' in native.body, 'Ollama\'s format: {error}')
  t.ok(native.ms >= QUEUE_TIMEOUT * 0.9, `after waiting its ${QUEUE_TIMEOUT} ms (${Math.round(native.ms)} ms)`)

  const diffusion = await post(`${b.url}/txt2img`, { model: 'sd', prompt: 'x' })
  t.equal(diffusion.status, 503)
  t.ok(Number(diffusion.headers.get('retry-after')) > 0)
  t.equal(typeof diffusion.body.error, 'string')
  t.equal(diffusion.body.detail, diffusion.body.error, 'the diffusion format: detail beside error')

  const openai = await post(`${b.url}/v1/chat/completions`, { model: 'm', messages: [{ role: 'user', content: 'x' }] })
  t.equal(openai.status, 503)
  t.ok(Number(openai.headers.get('retry-after')) > 0)
  t.match(openai.body, { error: { message: String, type: 'api_error', param: null, code: null } }, 'OpenAI\'s envelope')

  holder.abort()
  t.equal((await image).status, 200, 'the held image finished')
  await fleet.recorder.whenIdle()
  for (const deadline = performance.now() + 2000; (await fleet.heldGpus()).length > 0 && performance.now() < deadline;) await sleep(20)
  t.same(await fleet.heldGpus(), [])
  t.same(fleet.recorder.overlaps, [])
})

t.test('the catalogue: GET and HEAD /, /api/version, /api/ps listing what an upstream has loaded', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'llama3.2', gpus: [0], simulator: { models: ['llama3.2:latest'], tokens: 1 } }], options: FAST_POLL })
  const gw = await fleet.replica()
  const root = await fetch(`${gw.url}/`)
  t.equal(root.status, 200)
  t.equal(root.headers.get('content-type'), 'text/plain; charset=utf-8')
  t.equal(await root.text(), 'Ollama is running')
  const head = await fetch(`${gw.url}/`, { method: 'HEAD' })
  t.equal(head.status, 200)
  t.equal(head.headers.get('content-type'), 'text/plain; charset=utf-8')
  t.equal(await head.text(), '')

  const version = await eventually(`${gw.url}/api/version`, (s) => s === 200)
  t.equal(version.status, 200)
  t.match(version.body, { version: /^\d+\.\d+\.\d+/ }, `an Ollama version (${JSON.stringify(version.body)})`)

  // nothing loaded yet, on the upstream and so through the gateway once it has polled it; after
  // a request the upstream has the model resident, and /api/ps says so
  t.same((await (await fetch(`${fleet.upstreams[0].url}/api/ps`)).json()), { models: [] })
  const polled = (): boolean => fleet.upstreams[0].polls.some((p) => p.path === '/api/ps')
  for (const deadline = performance.now() + 5000; !polled() && performance.now() < deadline;) await sleep(20)
  t.ok(polled(), 'the gateway has polled the upstream\'s /api/ps')
  // once polled, the version is the upstream's own (the gateway's fallback is its own version)
  t.same((await eventually(`${gw.url}/api/version`, (s, b) => b?.version === '0.33.0')).body, { version: '0.33.0' }, 'the upstream\'s version')
  const before = await fetch(`${gw.url}/api/ps`)
  t.equal(before.status, 200)
  t.same(await before.json(), { models: [] }, 'the gateway lists nothing that is not loaded')
  t.equal((await post(`${gw.url}/api/generate`, { model: 'llama3.2', prompt: 'x', stream: false })).status, 200)
  const ps = await eventually(`${gw.url}/api/ps`, (s, b) => s === 200 && Array.isArray(b?.models) && b.models.length > 0)
  t.equal(ps.status, 200)
  t.equal(ps.body.models.length, 1)
  t.match(ps.body.models[0], { name: 'llama3.2:latest', model: 'llama3.2:latest', size_vram: Number, expires_at: String })
})

t.test('an image dying mid-body is cut off at the client; the GPU is freed', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'sd', kind: 'diffusor', gpus: [0] }] })
  const gw = await fleet.replica()
  fleet.upstreams[0].behaviour = { kind: 'die-mid-stream', afterLines: 1 }
  const res = await fetch(`${gw.url}/txt2img`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"model":"sd","prompt":"x"}' })
  t.equal(res.status, 200)
  t.equal(res.headers.get('content-type'), 'image/png')
  const read = await res.arrayBuffer().then(() => 'complete', (err: Error) => `failed: ${err.message}`)
  t.equal(read, 'failed: terminated', 'the client sees a broken answer, not a short PNG')
  for (const deadline = performance.now() + 2000; (await fleet.heldGpus()).length > 0 && performance.now() < deadline;) await sleep(20)
  t.same(await fleet.heldGpus(), [])
  fleet.upstreams[0].behaviour = { kind: 'normal' }
  t.equal((await post(`${gw.url}/txt2img`, { model: 'sd', prompt: 'x' })).status, 200, 'the next image is served')
})

t.test('502 and 504 in OpenAI\'s envelope and in the diffusion format', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1, 1],
    upstreams: [
      { model: 'gone', gpus: [0] },
      { model: 'sd-gone', kind: 'diffusor', gpus: [1] },
      { model: 'stuck', gpus: [2] },
      { model: 'sd-stuck', kind: 'diffusor', gpus: [3] }
    ],
    options: { UPSTREAM_HEADERS_TIMEOUT_MS: 300 }
  })
  const gw = await fleet.replica()
  await fleet.upstreams[0].close()
  await fleet.upstreams[1].close()
  fleet.upstreams[2].behaviour = { kind: 'stall-headers' }
  fleet.upstreams[3].behaviour = { kind: 'stall-headers' }
  const envelope = { error: { message: String, type: 'api_error', param: null, code: null } }

  let r = await post(`${gw.url}/v1/chat/completions`, { model: 'gone', messages: [{ role: 'user', content: 'x' }] })
  t.equal(r.status, 502, 'unreachable: 502')
  t.match(r.body, envelope, 'in OpenAI\'s envelope')
  r = await post(`${gw.url}/txt2img`, { model: 'sd-gone', prompt: 'x' })
  t.equal(r.status, 502)
  t.equal(typeof r.body.error, 'string')
  t.equal(r.body.detail, r.body.error, 'the diffusion format')
  r = await post(`${gw.url}/v1/images/generations`, { model: 'sd-gone', prompt: 'x', response_format: 'b64_json' })
  t.equal(r.status, 502)
  t.match(r.body, envelope)

  r = await post(`${gw.url}/v1/chat/completions`, { model: 'stuck', messages: [{ role: 'user', content: 'x' }] })
  t.equal(r.status, 504, 'no headers in time: 504')
  t.match(r.body, envelope)
  r = await post(`${gw.url}/txt2img`, { model: 'sd-stuck', prompt: 'x' })
  t.equal(r.status, 504)
  t.equal(r.body.detail, r.body.error)
  t.match(r.body.error, /sd-stuck/)
  r = await post(`${gw.url}/v1/images/generations`, { model: 'sd-stuck', prompt: 'x', response_format: 'b64_json' })
  t.equal(r.status, 504)
  t.match(r.body, envelope)

  for (const deadline = performance.now() + 2000; (await fleet.heldGpus()).length > 0 && performance.now() < deadline;) await sleep(20)
  t.same(await fleet.heldGpus(), [], 'every GPU free')
})
