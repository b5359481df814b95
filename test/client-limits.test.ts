// Per-key limits (CONTRACT 12.3): maxConcurrent, maxQueued, rpm answered 429 + Retry-After, models
// 403, each in the route's own error format; and every hold on a limit released when its request
// ends, however it ends (done, client gone, queue timeout, upstream failure). Real MariaDB (keys
// written straight into api_keys), Redis, the simulator, the real ollama and openai clients.
import t, { type Test } from 'tap'
import OpenAI from 'openai'
import { Ollama } from 'ollama'
import { startFleet, type Gateway, type TestFleet } from './helpers/gateway.js'
import { clientTokens, eventually, insertKey } from './helpers/api-keys.js'

async function fleetOf (t: Test): Promise<TestFleet> {
  return await startFleet(t, {
    gpus: [1, 1],
    migrate: true,
    upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 100, tokenDelayMs: 20 } }, { model: 'sd', kind: 'diffusor', gpus: [1] }]
  })
}

const json = (secret: string): Record<string, string> => ({ authorization: `Bearer ${secret}`, 'content-type': 'application/json' })

async function post (gw: Gateway, secret: string, path: string, body: unknown): Promise<{ status: number, retryAfter: string | null, body: any }> {
  const res = await fetch(gw.url + path, { method: 'POST', headers: json(secret), body: JSON.stringify(body) })
  const text = await res.text()
  let parsed: unknown
  try { parsed = JSON.parse(text) } catch { parsed = text }
  return { status: res.status, retryAfter: res.headers.get('retry-after'), body: parsed }
}

const generate = { model: 'm', prompt: 'x', stream: false, options: { num_predict: 1 } }

/** A streamed generate that holds its lease until `finish()` or `abort()`: resolves once its first line arrived. */
async function holding (gw: Gateway, secret: string): Promise<{ finish: () => Promise<void>, abort: () => void }> {
  const controller = new AbortController()
  const res = await fetch(gw.url + '/api/generate', {
    method: 'POST',
    headers: json(secret),
    body: JSON.stringify({ model: 'm', prompt: 'x', options: { num_predict: 100 } }),
    signal: controller.signal
  })
  if (res.status !== 200) throw new Error(`holding request answered ${res.status}: ${await res.text()}`)
  const reader = (res.body as ReadableStream<Uint8Array>).getReader()
  await reader.read()
  return {
    finish: async () => { while (!(await reader.read()).done); },
    abort: () => controller.abort()
  }
}

/** Sent now, answered later: a request that will wait in the queue. */
function queued (gw: Gateway, secret: string, signal?: AbortSignal): Promise<Response> {
  return fetch(gw.url + '/api/generate', { method: 'POST', headers: json(secret), body: JSON.stringify(generate), signal })
}

async function waiting (gw: Gateway): Promise<number> {
  const status = await (await fetch(gw.url + '/gpu/status')).json() as { waiting: Array<{ depth: number }> }
  return status.waiting.reduce((sum, q) => sum + q.depth, 0)
}

const onlyError = (body: any): string | undefined => Object.keys(body ?? {}).length === 1 ? body.error : undefined
const retryAfterOf = (err: any): string | null | undefined => err?.headers?.get?.('retry-after')

t.test('maxConcurrent: the request over it is 429 + Retry-After in each route format; the slot returns when a request ends', async (t) => {
  const fleet = await fleetOf(t)
  await insertKey(fleet.db.query, 'conc', 'secret-conc', { maxConcurrent: 1 })
  const gw = await fleet.replica()

  const first = await holding(gw, 'secret-conc')
  t.same(await clientTokens(fleet.prefix, 'key:conc'), { active: 1, waiting: 0 }, 'one request in flight, held as a token')

  const ollama = await post(gw, 'secret-conc', '/api/generate', generate)
  t.equal(ollama.status, 429, 'Ollama route: 429')
  t.ok(Number(ollama.retryAfter) >= 1, `Retry-After ${ollama.retryAfter}`)
  t.match(onlyError(ollama.body), /maxConcurrent 1/, 'Ollama format: {"error"} only')

  const openai = new OpenAI({ baseURL: gw.url + '/v1', apiKey: 'secret-conc', maxRetries: 0 })
  const refused = await openai.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'x' }], max_tokens: 1 }).catch((err) => err)
  t.ok(refused instanceof OpenAI.RateLimitError, 'the openai client sees a RateLimitError')
  t.equal(refused.status, 429)
  t.ok(Number(retryAfterOf(refused)) >= 1, 'with Retry-After')
  t.match(refused.error?.message, /maxConcurrent/, 'in the OpenAI envelope')

  const image = await post(gw, 'secret-conc', '/txt2img', { model: 'sd', prompt: 'x' })
  t.equal(image.status, 429, 'diffusion route: 429 (the limit is per key, whatever the model)')
  t.ok(Number(image.retryAfter) >= 1)
  t.ok(typeof image.body.error === 'string' && image.body.detail === image.body.error, 'diffusion format: error and detail')

  await first.finish()
  t.ok(await eventually(async () => (await clientTokens(fleet.prefix, 'key:conc')).active === 0), 'the slot is released when the request ends')
  t.equal((await post(gw, 'secret-conc', '/api/generate', generate)).status, 200, 'and the next request is served')
  t.equal((await post(gw, 'secret-conc', '/txt2img', { model: 'sd', prompt: 'x' })).status, 200)
  t.same(await clientTokens(fleet.prefix, 'key:conc'), { active: 0, waiting: 0 }, 'nothing left held')
})

t.test('maxQueued: with a request of the key waiting, the next is 429 at once; the waiter is served when the GPU frees', async (t) => {
  const fleet = await fleetOf(t)
  await insertKey(fleet.db.query, 'queue', 'secret-queue', { maxQueued: 1 })
  await insertKey(fleet.db.query, 'other', 'secret-other')
  const gw = await fleet.replica()

  const busy = await holding(gw, 'secret-other')
  const waiter = queued(gw, 'secret-queue')
  t.ok(await eventually(async () => await waiting(gw) === 1), 'the key\'s first request waits for the GPU')
  t.same(await clientTokens(fleet.prefix, 'key:queue'), { active: 0, waiting: 1 })

  const started = performance.now()
  const over = await post(gw, 'secret-queue', '/api/generate', generate)
  t.equal(over.status, 429, 'the second is refused')
  t.ok(performance.now() - started < 1000, 'at once, not after waiting')
  t.ok(Number(over.retryAfter) >= 1)
  t.match(onlyError(over.body), /maxQueued 1/)
  const ollama = await new Ollama({ host: gw.url, headers: { Authorization: 'Bearer secret-queue' } })
    .generate({ model: 'm', prompt: 'x', options: { num_predict: 1 } }).catch((err) => err)
  t.equal(ollama.status_code, 429, 'the ollama client sees the 429')
  t.match(ollama.error, /maxQueued/)
  const openai = await new OpenAI({ baseURL: gw.url + '/v1', apiKey: 'secret-queue', maxRetries: 0 })
    .chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'x' }], max_tokens: 1 }).catch((err) => err)
  t.ok(openai instanceof OpenAI.RateLimitError && Number(retryAfterOf(openai)) >= 1, 'the openai client: RateLimitError with Retry-After')
  t.match(openai.error?.message, /maxQueued/)
  const image = await post(gw, 'secret-queue', '/txt2img', { model: 'sd', prompt: 'x' })
  t.ok(image.status === 429 && image.body.detail === image.body.error && /maxQueued/.test(image.body.error), 'diffusion format (the limit is the key\'s, across models)')
  t.equal(await waiting(gw), 1, 'the refused requests never queued')

  await busy.finish()
  t.equal((await waiter).status, 200, 'the waiting request is served')
  t.ok(await eventually(async () => {
    const tokens = await clientTokens(fleet.prefix, 'key:queue')
    return tokens.active === 0 && tokens.waiting === 0
  }), 'nothing left held')
})

t.test('rpm: the request past the minute\'s allowance is 429 with the seconds until one fits, in each format', async (t) => {
  const fleet = await fleetOf(t)
  await insertKey(fleet.db.query, 'rpm-ollama', 's-rpm-ollama', { rpm: 2 })
  await insertKey(fleet.db.query, 'rpm-openai', 's-rpm-openai', { rpm: 2 })
  await insertKey(fleet.db.query, 'rpm-sd', 's-rpm-sd', { rpm: 1 })
  const gw = await fleet.replica()

  const started = Date.now()
  t.equal((await post(gw, 's-rpm-ollama', '/api/generate', generate)).status, 200)
  t.equal((await post(gw, 's-rpm-ollama', '/api/generate', generate)).status, 200)
  const third = await post(gw, 's-rpm-ollama', '/api/generate', generate)
  t.equal(third.status, 429, 'the third request of the minute is refused')
  const seconds = Number(third.retryAfter)
  t.ok(seconds >= 1 && seconds <= 60 - Math.floor((Date.now() - started) / 1000), `Retry-After ${third.retryAfter}: when the first leaves the window`)
  t.match(onlyError(third.body), /rpm 2/)
  t.equal((await post(gw, 's-rpm-ollama', '/api/generate', generate)).status, 429, 'refused requests do not reset the window, nor count in it')

  const openai = new OpenAI({ baseURL: gw.url + '/v1', apiKey: 's-rpm-openai', maxRetries: 0 })
  const chat = async (): Promise<any> => await openai.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'x' }], max_tokens: 1 }).catch((err) => err)
  t.ok((await chat()).choices, 'first')
  t.ok((await chat()).choices, 'second')
  const refused = await chat()
  t.ok(refused instanceof OpenAI.RateLimitError, 'third: RateLimitError')
  t.ok(Number(retryAfterOf(refused)) >= 1)

  t.equal((await post(gw, 's-rpm-sd', '/txt2img', { model: 'sd', prompt: 'x' })).status, 200)
  const image = await post(gw, 's-rpm-sd', '/txt2img', { model: 'sd', prompt: 'x' })
  t.equal(image.status, 429)
  t.ok(Number(image.retryAfter) >= 1)
  t.ok(image.body.detail === image.body.error && /rpm 1/.test(image.body.error), 'diffusion format')
})

t.test('models: a model outside the key\'s list is 403 in each format; names match as Ollama matches them', async (t) => {
  const fleet = await fleetOf(t)
  await insertKey(fleet.db.query, 'llm-only', 's-llm', { models: 'M, other-model' })
  await insertKey(fleet.db.query, 'sd-only', 's-sd', { models: '["sd"]' })
  const gw = await fleet.replica()

  t.equal((await post(gw, 's-llm', '/api/generate', { ...generate, model: 'm:latest' })).status, 200, 'm:latest is m')
  const image = await post(gw, 's-llm', '/txt2img', { model: 'sd', prompt: 'x' })
  t.equal(image.status, 403, 'diffusion route: 403')
  t.equal(image.retryAfter, null, 'no Retry-After: waiting will not help')
  t.ok(image.body.detail === image.body.error && image.body.error === "this API key may not use model 'sd'", 'diffusion format')

  const ollama = await new Ollama({ host: gw.url, headers: { Authorization: 'Bearer s-sd' } })
    .generate({ model: 'm', prompt: 'x', options: { num_predict: 1 } }).catch((err) => err)
  t.equal(ollama.status_code, 403, 'Ollama route: 403')
  t.equal(ollama.error, "this API key may not use model 'm'")
  const openai = new OpenAI({ baseURL: gw.url + '/v1', apiKey: 's-sd', maxRetries: 0 })
  const refused = await openai.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'x' }], max_tokens: 1 }).catch((err) => err)
  t.ok(refused instanceof OpenAI.PermissionDeniedError, 'openai client: PermissionDeniedError')
  t.equal(refused.error?.message, "this API key may not use model 'm'")
  t.equal((await post(gw, 's-sd', '/txt2img', { model: 'sd', prompt: 'x' })).status, 200, 'its own model works')
  t.equal(fleet.upstreams[0].requests.length, 1, 'no refused request reached an upstream')
})

t.test('a hold on the limits is released on completion, client abort (in flight and queued), queue timeout, upstream failure and an unreachable upstream', async (t) => {
  const fleet = await fleetOf(t)
  await insertKey(fleet.db.query, 'rel', 's-rel', { maxConcurrent: 1, maxQueued: 1 })
  await insertKey(fleet.db.query, 'other', 's-other')
  const gw = await fleet.replica({ QUEUE_TIMEOUT_MS: 400 })
  const tokens = async (): Promise<{ active: number, waiting: number }> => await clientTokens(fleet.prefix, 'key:rel')
  const free = async (): Promise<boolean> => await eventually(async () => {
    const now = await tokens()
    return now.active === 0 && now.waiting === 0
  })

  t.equal((await post(gw, 's-rel', '/api/generate', generate)).status, 200)
  t.ok(await free(), 'completed')

  const inFlight = await holding(gw, 's-rel')
  t.same(await tokens(), { active: 1, waiting: 0 })
  inFlight.abort()
  t.ok(await free(), 'client left mid-stream')

  let busy = await holding(gw, 's-other')
  const controller = new AbortController()
  const gone = queued(gw, 's-rel', controller.signal).catch((err) => err)
  t.ok(await eventually(async () => (await tokens()).waiting === 1), 'waiting')
  controller.abort()
  await gone
  t.ok(await free(), 'client left while waiting')

  const timedOut = await post(gw, 's-rel', '/api/generate', generate)
  t.equal(timedOut.status, 503, 'queue timeout')
  t.ok(await free(), 'released after the queue timeout')
  await busy.finish()

  fleet.upstreams[0].behaviour = { kind: 'error', status: 500, body: { error: 'out of memory' } }
  t.equal((await post(gw, 's-rel', '/api/generate', generate)).status, 500, 'the upstream\'s own failure passes through')
  t.ok(await free(), 'released after an upstream error')

  fleet.upstreams[0].behaviour = { kind: 'die-mid-stream', afterLines: 1 }
  const cut = await fetch(gw.url + '/api/generate', { method: 'POST', headers: json('s-rel'), body: JSON.stringify({ model: 'm', prompt: 'x' }) })
  t.match(await cut.text(), /upstream failed mid-stream/)
  t.ok(await free(), 'released after the upstream died mid-stream')

  fleet.upstreams[0].behaviour = { kind: 'normal' }
  busy = await holding(gw, 's-rel')
  t.equal((await post(gw, 's-rel', '/api/generate', generate)).status, 429, 'the limit still holds (nothing leaked the other way either)')
  await busy.finish()
  t.equal((await post(gw, 's-rel', '/api/generate', generate)).status, 200, 'and its one slot is usable again')
  t.ok(await free())

  await fleet.upstreams[0].close()
  t.equal((await post(gw, 's-rel', '/api/generate', generate)).status, 502, 'the only upstream unreachable')
  t.ok(await free(), 'released after the upstream could not be reached')
})
