// How the gateway passes on an answer that breaks: by its framing and content type (issue 16).
// NDJSON and SSE streams end with one error record in their own format; any other answer is cut
// off, so the client sees a broken response rather than a "complete" one with a line glued on.
import t from 'tap'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { Ollama } from 'ollama'
import { startFleet } from './helpers/gateway.js'

/** Reads a body to its end: the bytes that arrived, and the error if the read broke off. */
async function readBody (res: Response): Promise<{ text: string, error?: string }> {
  let text = ''
  const decoder = new TextDecoder()
  try {
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) text += decoder.decode(chunk, { stream: true })
    return { text }
  } catch (err) {
    return { text, error: (err as Error).message }
  }
}

async function generate (url: string, body: unknown): Promise<Response> {
  return await fetch(`${url}/api/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
}

t.test('a chunked application/json answer cut mid-body is cut off at the client, no NDJSON line glued on', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0] }] })
  const gw = await fleet.replica()
  const sim = fleet.upstreams[0]

  // the whole answer, for comparison: over 2 KB (its context), so Ollama sends it chunked
  const whole = await generate(gw.url, { model: 'm', prompt: 'x', stream: false })
  const wholeText = await whole.text()
  t.ok(wholeText.length > 2048, `a non-streamed generate is ${wholeText.length} bytes`)
  t.equal(whole.headers.get('content-length'), null, 'passed on without a Content-Length')

  sim.behaviour = { kind: 'die-mid-stream', afterLines: 1 }
  const res = await generate(gw.url, { model: 'm', prompt: 'x', stream: false })
  t.equal(res.status, 200)
  t.match(res.headers.get('content-type'), /^application\/json/)
  const got = await readBody(res)
  t.ok(got.error !== undefined, `the client's read fails (${got.error ?? 'it completed'})`)
  t.notMatch(got.text, /"error"/, 'no error record in a JSON body')
  t.ok(got.text.startsWith('{"model":"m",') && got.text.length < wholeText.length, 'what arrived is the start of an answer, untouched')

  // the ollama client sees a failure, not a parse of a glued-on line
  await t.rejects(new Ollama({ host: gw.url }).generate({ model: 'm', prompt: 'x' }))
  sim.behaviour = { kind: 'normal' }
  await fleet.recorder.whenIdle()
  t.same(await fleet.heldGpus(), [], 'the GPU is free')
})

t.test('an upstream silent mid-stream past UPSTREAM_HEADERS_TIMEOUT_MS: the NDJSON stream ends with one {"error"} line', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 6, tokenDelayMs: 10 } }],
    options: { UPSTREAM_HEADERS_TIMEOUT_MS: 400 }
  })
  const gw = await fleet.replica()
  fleet.upstreams[0].behaviour = { kind: 'slow-body', afterLines: 2 }
  const started = performance.now()
  const res = await generate(gw.url, { model: 'm', prompt: 'x' })
  const got = await readBody(res)
  const took = performance.now() - started
  t.equal(got.error, undefined, 'the stream ends properly')
  const lines = got.text.trim().split('\n').map((l) => JSON.parse(l))
  t.equal(lines.length, 3, 'two lines, then the error line')
  t.same(lines.slice(0, 2).map((l) => l.done), [false, false])
  t.match(lines[2], { error: /upstream failed mid-stream/ })
  // bounded: the silence is noticed after about the timeout (undici's timers are coarse, up to ~1 s late)
  t.ok(took >= 380 && took < 3000, `ended after ${Math.round(took)} ms (timeout 400 ms)`)
  await sleep(50)
  t.same(await fleet.heldGpus(), [], 'the GPU is free')
})

t.test('cuts inside a line and Ollama\'s own error line, through the gateway', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 6 } }] })
  const gw = await fleet.replica()
  const sim = fleet.upstreams[0]

  sim.behaviour = { kind: 'die-mid-stream', afterLines: 2, midLine: true }
  let got = await readBody(await generate(gw.url, { model: 'm', prompt: 'x' }))
  t.equal(got.error, undefined, 'the client gets a stream that ends')
  let lines = got.text.split('\n')
  t.equal(lines.at(-1), '', 'ending with a newline')
  lines = lines.slice(0, -1)
  t.equal(lines.length, 4, 'two lines, the broken piece, the error line')
  t.throws(() => JSON.parse(lines[2]), 'the piece stays as it came')
  t.match(JSON.parse(lines[3]), { error: /upstream failed mid-stream/ }, 'the error record is a line of its own')

  sim.behaviour = { kind: 'error-mid-stream', afterLines: 2, message: 'model runner has unexpectedly stopped' }
  got = await readBody(await generate(gw.url, { model: 'm', prompt: 'x' }))
  lines = got.text.trim().split('\n')
  t.equal(lines.length, 3)
  t.same(JSON.parse(lines[2]), { error: 'model runner has unexpectedly stopped' }, "Ollama's own error line passes as it is, and alone")
  await t.rejects(async () => {
    for await (const part of await new Ollama({ host: gw.url }).generate({ model: 'm', prompt: 'x', stream: true })) void part
  }, /unexpectedly stopped/, 'ollama-js throws with the upstream\'s message')
  sim.behaviour = { kind: 'normal' }
  await fleet.recorder.whenIdle()
  t.same(await fleet.heldGpus(), [])
  t.same(fleet.recorder.overlaps, [])
})

t.test('a client that leaves mid-stream: its GPU stays leased until the upstream has noticed', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    // the runner notices the cancel 80 ms later (the simulator keeps the GPU busy that long)
    upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 200, tokenDelayMs: 10, cancelDelayMs: 80 } }],
    options: { UPSTREAM_CANCEL_GRACE_MS: 250 }
  })
  const gw = await fleet.replica()
  const ac = new AbortController()
  const res = await fetch(`${gw.url}/api/generate`, { method: 'POST', body: '{"model":"m","prompt":"x"}', signal: ac.signal })
  const reader = res.body!.getReader()
  await reader.read()
  ac.abort()
  const left = performance.now()
  const next = await generate(gw.url, { model: 'm', prompt: 'next', stream: false, options: { num_predict: 1 } })
  t.equal(next.status, 200)
  const waited = performance.now() - left
  await next.text()
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [], 'the next request did not start while the upstream still computed')
  t.ok(waited >= 200 && waited < 3000, `the next request waited ${Math.round(waited)} ms (grace 250 ms)`)
  t.same(await fleet.heldGpus(), [])
})
