import t, { type Test } from 'tap'
import http from 'node:http'
import zlib from 'node:zlib'
import { performance } from 'node:perf_hooks'
import { Ollama } from 'ollama'
import { eventually } from './helpers/api-keys.js'
import {
  GpuRecorder,
  PNG_SIGNATURE,
  readPng,
  startDiffusionSimulator,
  startSimulator,
  type Simulator,
  type SimulatorOptions
} from './helpers/upstream-simulator.js'

const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

interface RawAnswer {
  status: number
  headers: http.IncomingHttpHeaders
  body: Buffer
}

/** A request with full control over the headers (fetch would not let us set Host). */
async function raw (sim: Simulator, method: string, path: string, headers: Record<string, string> = {}, body?: string): Promise<RawAnswer> {
  return await new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: sim.port, method, path, headers, agent: false }, res => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }))
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end(body)
  })
}

async function post (sim: Simulator, path: string, body: unknown): Promise<Response> {
  return await fetch(sim.url + path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: typeof body === 'string' ? body : JSON.stringify(body)
  })
}

/** Reads a streamed body, noting when each line arrived. Rejects if the stream breaks. */
async function readLines (res: Response, sep = '\n'): Promise<Array<{ line: string, at: number }>> {
  const out: Array<{ line: string, at: number }> = []
  const reader = res.body!.getReader()
  const decoder = new TextDecoder()
  let buf = ''
  for (;;) {
    const { done, value } = await reader.read()
    if (done) break
    buf += decoder.decode(value, { stream: true })
    let i: number
    while ((i = buf.indexOf(sep)) >= 0) {
      out.push({ line: buf.slice(0, i), at: performance.now() })
      buf = buf.slice(i + sep.length)
    }
  }
  return out
}

t.test('Ollama: info routes, 404s and the host check', async t => {
  const sim = await startSimulator({ models: ['llama3.2:latest', 'nomic-embed-text'] })
  t.teardown(sim.close)

  let r = await raw(sim, 'GET', '/')
  t.equal(r.status, 200)
  t.equal(r.headers['content-type'], 'text/plain; charset=utf-8')
  t.equal(r.body.toString(), 'Ollama is running')
  r = await raw(sim, 'HEAD', '/')
  t.equal(r.status, 200)
  t.equal(r.body.length, 0)

  t.same(await (await fetch(sim.url + '/api/version')).json(), { version: '0.33.0' })

  const tags = await (await fetch(sim.url + '/api/tags')).json() as any
  t.same(tags.models.map((m: any) => m.name), ['llama3.2:latest', 'nomic-embed-text:latest'])
  t.match(tags.models[0], { model: 'llama3.2:latest', modified_at: String, size: Number, digest: /^[0-9a-f]{64}$/, details: { format: 'gguf', family: String, families: Array, parameter_size: String, quantization_level: String } })
  // a fresh server has nothing loaded; /api/ps lists a model once a request has loaded it
  t.same(await (await fetch(sim.url + '/api/ps')).json(), { models: [] })
  t.equal((await post(sim, '/api/generate', { model: 'llama3.2', prompt: '' })).status, 200)
  const ps = await (await fetch(sim.url + '/api/ps')).json() as any
  t.equal(ps.models.length, 1)
  t.match(ps.models[0], { name: 'llama3.2:latest', model: 'llama3.2:latest', size_vram: Number, expires_at: String, context_length: 4096, details: Object })

  let res = await post(sim, '/api/show', { model: 'LLAMA3.2' })
  t.equal(res.status, 200)
  t.match(await res.json(), { details: { format: 'gguf' }, capabilities: Array })
  res = await post(sim, '/api/show', { name: 'llama3.2' }) // legacy field
  t.equal(res.status, 200)
  res = await post(sim, '/api/show', {})
  t.equal(res.status, 400)
  t.same(await res.json(), { error: 'model is required' })

  for (const [method, path] of [['GET', '/nope'], ['POST', '/api/nope']]) {
    r = await raw(sim, method, path)
    t.equal(r.status, 404, `${method} ${path}`)
    t.equal(r.headers['content-type'], 'text/plain')
    t.equal(r.body.toString(), '404 page not found')
  }
  // gin with HandleMethodNotAllowed: a known path with the wrong method
  for (const [method, path] of [['GET', '/api/generate'], ['POST', '/api/version'], ['HEAD', '/api/ps']]) {
    r = await raw(sim, method, path)
    t.equal(r.status, 405, `${method} ${path}`)
    t.equal(r.headers['content-type'], 'text/plain')
    if (method !== 'HEAD') t.equal(r.body.toString(), '405 method not allowed')
  }

  for (const host of ['evil.example.com', 'evil.example.com:11434', '8.8.8.8']) {
    r = await raw(sim, 'GET', '/api/version', { Host: host })
    t.equal(r.status, 403, `Host ${host}`)
    t.equal(r.body.length, 0)
  }
  for (const host of ['localhost', 'localhost:11434', '127.0.0.1:9', '127.1.2.3', '[::1]:11434', '10.0.0.7:11434', '192.168.1.20', '172.16.0.1', 'gpu.local', sim.host]) {
    r = await raw(sim, 'GET', '/api/version', { Host: host })
    t.equal(r.status, 200, `Host ${host}`)
  }
  const open = await startSimulator({ hostCheck: false })
  t.teardown(open.close)
  t.equal((await raw(open, 'GET', '/api/version', { Host: 'evil.example.com' })).status, 200)

  const ollama = new Ollama({ host: sim.url })
  t.same(await ollama.version(), { version: '0.33.0' })
  t.equal((await ollama.list()).models.length, 2)
  t.match(await ollama.show({ model: 'nomic-embed-text' }), { details: { format: 'gguf' } })
  await ollama.embed({ model: 'nomic-embed-text', input: 'x' })
  t.same((await ollama.ps()).models.map(m => m.name).sort(), ['llama3.2:latest', 'nomic-embed-text:latest'])
  t.ok(sim.requests.some(q => q.path === '/api/show' && q.body.model === 'LLAMA3.2'), 'requests are recorded')
})

t.test('Ollama: streamed generate is chunked NDJSON, one line per token, spread over time', async t => {
  const sim = await startSimulator({ tokens: 5, tokenDelayMs: 30 })
  t.teardown(sim.close)
  const r = await raw(sim, 'POST', '/api/generate', { 'Content-Type': 'application/json' }, JSON.stringify({ model: 'llama3.2', prompt: 'hi' }))
  t.equal(r.headers['content-type'], 'application/x-ndjson')
  t.equal(r.headers['transfer-encoding'], 'chunked')

  const res = await post(sim, '/api/generate', { model: 'Llama3.2', prompt: 'Why is the sky blue?' })
  const lines = await readLines(res)
  t.equal(lines.length, 6)
  const objs = lines.map(l => JSON.parse(l.line))
  for (const o of objs.slice(0, 5)) t.match(o, { model: 'Llama3.2', created_at: String, response: String, done: false })
  t.match(objs[5], { model: 'Llama3.2', response: '', done: true, done_reason: 'stop', total_duration: Number, eval_count: 5 })
  for (let i = 1; i < 5; i++) t.ok(lines[i].at - lines[i - 1].at >= 15, `token ${i} arrived on its own (${(lines[i].at - lines[i - 1].at).toFixed(1)} ms after the previous)`)
  t.ok(lines[4].at - lines[0].at >= 90, 'tokens are spread over time')

  // stream: null streams too; stream: false is one JSON object
  t.equal((await post(sim, '/api/generate', { model: 'llama3.2', prompt: 'x', stream: null })).headers.get('content-type'), 'application/x-ndjson')
  const one = await post(sim, '/api/generate', { model: 'llama3.2', prompt: 'x', stream: false })
  t.equal(one.headers.get('content-type'), 'application/json; charset=utf-8')
  t.match(await one.json(), { model: 'llama3.2', response: 'The sky is blue because', done: true, done_reason: 'stop', eval_count: 5 })
  const limited = await post(sim, '/api/generate', { model: 'llama3.2', prompt: 'x', stream: false, options: { num_predict: 2 } })
  t.match(await limited.json(), { response: 'The sky', done_reason: 'length', eval_count: 2 })
  t.match(await (await post(sim, '/api/generate', { model: 'llama3.2' })).json(), { done: true, done_reason: 'load' })
  t.match(await (await post(sim, '/api/generate', { model: 'llama3.2', keep_alive: 0 })).json(), { done: true, done_reason: 'unload' })
})

t.test('Ollama: the ollama client — streamed generate, chat, embed', async t => {
  const sim = await startSimulator({ models: ['llama3.2:latest', 'nomic-embed-text'], tokenDelayMs: 5 })
  t.teardown(sim.close)
  const ollama = new Ollama({ host: sim.url })

  const parts: string[] = []
  let last: any
  for await (const part of await ollama.generate({ model: 'llama3.2', prompt: 'hi', stream: true })) {
    parts.push(part.response ?? '')
    last = part
  }
  t.equal(parts.join(''), 'The sky is blue because')
  t.match(last, { done: true, done_reason: 'stop' })

  const chat = await ollama.chat({ model: 'Llama3.2:latest', messages: [{ role: 'user', content: 'hi' }] })
  t.match(chat, { model: 'Llama3.2:latest', message: { role: 'assistant', content: 'The sky is blue because' }, done: true, done_reason: 'stop', eval_count: 5 })
  t.same(sim.requests.at(-1)?.body.stream, false, 'the client sent stream: false')

  const chunks: string[] = []
  for await (const part of await ollama.chat({ model: 'llama3.2', messages: [{ role: 'user', content: 'hi' }], stream: true })) {
    if (!part.done) {
      t.equal(part.message.role, 'assistant')
      chunks.push(part.message.content)
    }
  }
  t.equal(chunks.length, 5)

  const e1 = await ollama.embed({ model: 'nomic-embed-text', input: 'hello' })
  t.equal(e1.model, 'nomic-embed-text')
  t.equal(e1.embeddings.length, 1)
  t.equal(e1.embeddings[0].length, 768, 'nomic-embed-text size by default')
  t.ok(Math.abs(Math.hypot(...e1.embeddings[0]) - 1) < 1e-6, 'unit vector')
  const e2 = await ollama.embed({ model: 'nomic-embed-text', input: ['hello', 'world'] })
  t.equal(e2.embeddings.length, 2)
  t.same(e2.embeddings[0], e1.embeddings[0], 'deterministic')
  t.notSame(e2.embeddings[1], e1.embeddings[0])

  const legacy = await post(sim, '/api/embeddings', { model: 'nomic-embed-text', prompt: 'hello' })
  t.equal(legacy.headers.get('content-type'), 'application/json; charset=utf-8')
  t.same(await legacy.json(), { embedding: e1.embeddings[0] })
})

t.test('Ollama: error answers', async t => {
  const sim = await startSimulator({ tokenDelayMs: 1 })
  t.teardown(sim.close)
  const expectError = async (path: string, body: unknown, status: number, error: string | RegExp): Promise<void> => {
    const res = await post(sim, path, body)
    t.equal(res.status, status, `${path} ${JSON.stringify(body)} status`)
    t.equal(res.headers.get('content-type'), 'application/json; charset=utf-8')
    const json = await res.json() as { error: string }
    if (typeof error === 'string') t.equal(json.error, error)
    else t.match(json.error, error)
  }
  await expectError('/api/generate', { prompt: 'x' }, 404, "model '' not found")
  await expectError('/api/embed', { input: 'x' }, 404, "model '' not found")
  await expectError('/api/chat', { messages: [] }, 400, 'model is required')
  await expectError('/api/embeddings', { prompt: 'x' }, 400, 'model is required')
  await expectError('/api/generate', { model: 'Mistral:7B', prompt: 'x' }, 404, "model 'Mistral:7B' not found")
  await expectError('/api/chat', { model: 'llama3.2:1b', messages: [{ role: 'user', content: 'x' }] }, 404, "model 'llama3.2:1b' not found")
  await expectError('/api/generate', '{"model":', 400, 'unexpected EOF')
  await expectError('/api/chat', '{bad json', 400, /^invalid character/)
  await expectError('/api/generate', '', 400, 'missing request body')
  await expectError('/api/generate', { model: 5 }, 400, 'json: cannot unmarshal number into Go struct field GenerateRequest.model of type string')
  await expectError('/api/generate', { model: 'llama3.2', prompt: 'x', keep_alive: '300' }, 400, 'time: missing unit in duration "300"')
  await expectError('/api/chat', { model: 'llama3.2', messages: [], keep_alive: '5 minutes' }, 400, /^time: /)
  await expectError('/api/embed', { model: 'llama3.2', input: 5 }, 400, 'invalid input type')
  for (const keepAlive of ['5m', '-1m', '1h30m', '0', 300, -1, 0]) {
    const res = await post(sim, '/api/generate', { model: 'llama3.2', prompt: 'x', stream: false, keep_alive: keepAlive })
    t.equal(res.status, 200, `keep_alive ${JSON.stringify(keepAlive)} is fine`)
  }

  const ollama = new Ollama({ host: sim.url })
  const err = await ollama.generate({ model: 'nope', prompt: 'x' }).catch((e: unknown) => e) as any
  t.equal(err?.name, 'ResponseError')
  t.equal(err?.status_code, 404)
  t.equal(err?.error, "model 'nope' not found")
})

t.test('Ollama: OpenAI-compatible routes', async t => {
  const sim = await startSimulator({ models: ['llama3.2:latest', 'nomic-embed-text'], tokenDelayMs: 2, embedDims: 8 })
  t.teardown(sim.close)

  const models = await (await fetch(sim.url + '/v1/models')).json() as any
  t.match(models, { object: 'list', data: [{ id: 'llama3.2:latest', object: 'model', created: Number, owned_by: String }, { id: 'nomic-embed-text:latest' }] })
  t.match(await (await fetch(sim.url + '/v1/models/llama3.2')).json(), { id: 'llama3.2', object: 'model' })
  let res = await fetch(sim.url + '/v1/models/nope')
  t.equal(res.status, 404)
  t.same(await res.json(), { error: { message: "model 'nope' not found", type: 'not_found_error', param: null, code: null } })

  res = await post(sim, '/v1/chat/completions', { model: 'llama3.2', messages: [{ role: 'user', content: 'hi' }] })
  t.equal(res.headers.get('content-type'), 'application/json; charset=utf-8', 'stream defaults to false')
  t.match(await res.json(), {
    id: /^chatcmpl-/,
    object: 'chat.completion',
    model: 'llama3.2',
    choices: [{ index: 0, message: { role: 'assistant', content: 'The sky is blue because' }, finish_reason: 'stop' }],
    usage: { prompt_tokens: Number, completion_tokens: 5, total_tokens: Number }
  })

  res = await post(sim, '/v1/chat/completions', { model: 'llama3.2', messages: [{ role: 'user', content: 'hi' }], stream: true, stream_options: { include_usage: true } })
  t.equal(res.headers.get('content-type'), 'text/event-stream')
  const events = (await readLines(res, '\n\n')).map(e => e.line)
  t.equal(events.at(-1), 'data: [DONE]')
  t.ok(events.every(e => e.startsWith('data: ')))
  const chunks = events.slice(0, -1).map(e => JSON.parse(e.slice(6)))
  t.match(chunks[0], { object: 'chat.completion.chunk', model: 'llama3.2', choices: [{ index: 0, delta: { role: 'assistant', content: 'The' }, finish_reason: null }] })
  t.equal(chunks.filter(c => c.choices[0]?.finish_reason === 'stop').length, 1)
  t.match(chunks.at(-1), { choices: [], usage: { completion_tokens: 5 } })

  res = await post(sim, '/v1/completions', { model: 'llama3.2', prompt: 'hi' })
  t.match(await res.json(), { object: 'text_completion', choices: [{ text: 'The sky is blue because', index: 0, finish_reason: 'stop' }] })
  res = await post(sim, '/v1/completions', { model: 'llama3.2', prompt: 'hi', stream: true })
  const cevents = (await readLines(res, '\n\n')).map(e => e.line)
  t.equal(cevents.at(-1), 'data: [DONE]')
  t.match(JSON.parse(cevents[0].slice(6)), { object: 'text_completion', choices: [{ text: 'The' }] })

  const floats = await (await post(sim, '/v1/embeddings', { model: 'nomic-embed-text', input: ['a', 'b'] })).json() as any
  t.match(floats, { object: 'list', model: 'nomic-embed-text', data: [{ object: 'embedding', index: 0 }, { object: 'embedding', index: 1 }], usage: { prompt_tokens: Number, total_tokens: Number } })
  t.equal(floats.data[0].embedding.length, 8)
  const b64 = await (await post(sim, '/v1/embeddings', { model: 'nomic-embed-text', input: ['a', 'b'], encoding_format: 'base64' })).json() as any
  t.type(b64.data[0].embedding, 'string')
  const bytes = Buffer.from(b64.data[1].embedding, 'base64')
  const decoded = Array.from({ length: bytes.length / 4 }, (_, i) => bytes.readFloatLE(i * 4))
  t.same(decoded, floats.data[1].embedding, 'base64 is float32 little-endian of the same vector')

  const expectError = async (path: string, body: unknown, status: number, type: string, message: string | RegExp): Promise<void> => {
    const r = await post(sim, path, body)
    t.equal(r.status, status, `${path} ${JSON.stringify(body)}`)
    t.match(await r.json(), { error: { message, type, param: null, code: null } })
  }
  await expectError('/v1/chat/completions', { model: 'llama3.2', messages: [] }, 400, 'invalid_request_error', "[] is too short - 'messages'")
  await expectError('/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }] }, 400, 'invalid_request_error', 'model is required')
  await expectError('/v1/chat/completions', { model: 'gpt-4', messages: [{ role: 'user', content: 'x' }] }, 404, 'not_found_error', "model 'gpt-4' not found")
  await expectError('/v1/chat/completions', '{oops', 400, 'invalid_request_error', /^invalid character/)
  await expectError('/v1/embeddings', { model: 'nomic-embed-text', input: '' }, 400, 'invalid_request_error', 'invalid input')
})

t.test('GpuRecorder: overlaps, sequential use, idle gaps', async t => {
  const rec = new GpuRecorder()
  const a = rec.enter(['g0', 'g1'], 'a')
  t.same(rec.busy().sort(), ['g0', 'g1'])
  const b = rec.enter(['g1'], 'b')
  t.equal(rec.overlaps.length, 1)
  t.match(rec.overlaps[0], { gpuId: 'g1', holders: ['a', 'b'], at: Number })
  t.equal(rec.maxConcurrent, 2)
  rec.exit(a)
  rec.exit(a) // twice is harmless
  t.same(rec.busy(), ['g1'])
  rec.exit(b)
  t.same(rec.busy(), [])
  t.equal(rec.events.length, 4)
  await sleep(20)
  const c = rec.enter(['g1'], 'c')
  rec.exit(c)
  const gaps = rec.idleGaps('g1')
  t.equal(gaps.length, 1, 'g1 was free once between works')
  t.ok(gaps[0] >= 15, `gap ${gaps[0]} ms`)
  rec.reset()
  t.same([rec.events.length, rec.overlaps.length, rec.maxConcurrent], [0, 0, 0])
  await rec.whenIdle()
})

t.test('GpuRecorder: a capacity of N holds N works without an overlap, and records which models ran together', async t => {
  const rec = new GpuRecorder()
  const a = rec.enter(['g0'], 'a', { model: 'm1', capacity: 2 })
  const b = rec.enter(['g0'], 'b', { model: 'm2', capacity: 2 })
  t.equal(rec.overlaps.length, 0, 'two works within a capacity of 2')
  t.equal(rec.peak('g0'), 2)
  t.same(rec.together.map(x => x.models), [['m1', 'm2']])
  const c = rec.enter(['g0'], 'c', { model: 'm1', capacity: 2 })
  t.equal(rec.overlaps.length, 1, 'a third one is over capacity')
  t.same(rec.overlaps[0].holders, ['a', 'b', 'c'])
  t.equal(rec.peak('g0'), 3)
  for (const w of [a, b, c]) rec.exit(w)
  t.match(rec.events.filter(e => e.type === 'start').map(e => e.model), ['m1', 'm2', 'm1'])
  rec.reset()
  t.equal(rec.peak('g0'), 0)
})

t.test('Ollama numParallel: N requests run at once, the rest wait inside the server', async t => {
  const sim = await startSimulator({ numParallel: 2, tokens: 3, tokenDelayMs: 40, loadMs: 0, resident: ['llama3.2'] })
  t.teardown(sim.close)
  const ollama = new Ollama({ host: sim.url })
  const started = performance.now()
  const ends: number[] = []
  let maxRunning = 0
  // requests the server has been sent and not yet answered (the recorder's starts less its ends)
  const inServer = (): number => sim.recorder.events.reduce((n, e) => n + (e.type === 'start' ? 1 : e.type === 'end' ? -1 : 0), 0)
  let waitedInside = false
  const poll = setInterval(() => {
    maxRunning = Math.max(maxRunning, sim.running())
    if (sim.running() === 2 && inServer() === 3) waitedInside = true
  }, 5)
  await Promise.all([1, 2, 3].map(async i => {
    await ollama.generate({ model: 'llama3.2', prompt: `p${i}` })
    ends.push(performance.now() - started)
  }))
  clearInterval(poll)
  t.equal(maxRunning, 2, 'never more than numParallel running')
  // the third was in the server while two ran: it waited there for a slot (two run ~3 tokens × 40 ms)
  t.ok(waitedInside, `the third waited inside the server: ends ${ends.map(e => e.toFixed(0)).join(', ')} ms`)
  await sim.recorder.whenIdle()
  t.equal(sim.recorder.peak(sim.gpuIds[0]), 3, 'the recorder counts what the server was sent')
  t.equal(sim.recorder.overlaps.length, 1, 'a third request at once is over the capacity of 2')
})

t.test('Ollama residency: load time, /api/ps, eviction, load-only and unload requests', async t => {
  const sim = await startSimulator({ models: ['a', 'b', 'c'], loadMs: 120, maxLoadedModels: 2, tokens: 1, tokenDelayMs: 1 })
  t.teardown(sim.close)
  const ollama = new Ollama({ host: sim.url })
  const timed = async (fn: () => Promise<unknown>): Promise<number> => { const t0 = performance.now(); await fn(); return performance.now() - t0 }

  const cold = await timed(async () => await ollama.generate({ model: 'a', prompt: 'x' }))
  const warm = await timed(async () => await ollama.generate({ model: 'a', prompt: 'x' }))
  t.ok(cold >= 110, `a cold model takes its load time (${cold.toFixed(0)} ms)`)
  t.ok(warm < cold - 60, `a resident one does not (${warm.toFixed(0)} ms)`)
  t.same(sim.loads.map(l => l.model), ['a:latest'])

  // streamed: the headers come with the first token, after the load
  const t0 = performance.now()
  const res = await fetch(sim.url + '/api/generate', { method: 'POST', body: JSON.stringify({ model: 'b', prompt: 'x' }) })
  t.ok(performance.now() - t0 >= 110, 'no status line before the model has loaded')
  await res.text()

  let ps = await ollama.ps()
  t.same(ps.models.map(m => m.name).sort(), ['a:latest', 'b:latest'])
  t.ok(ps.models.every(m => m.size_vram > 0 && Date.parse(String(m.expires_at)) > Date.now() + 4 * 60_000), 'default keep-alive of 5 minutes')
  t.equal((ps.models[0] as any).context_length, 4096)

  // a third model evicts the least recently used (a)
  await ollama.generate({ model: 'c', prompt: 'x', options: { num_ctx: 8192 } as any })
  ps = await ollama.ps()
  t.same(ps.models.map(m => m.name).sort(), ['b:latest', 'c:latest'])
  t.equal((ps.models.find(m => m.name === 'c:latest') as any).context_length, 8192)
  t.same(sim.unloads.map(u => u.model), ['a:latest'])

  // empty prompt only loads; keep_alive 0 with it unloads; a negative keep_alive is forever
  const load = await ollama.generate({ model: 'a', prompt: '', keep_alive: -1 })
  t.match(load, { done: true, done_reason: 'load', response: '' })
  t.same(sim.loads.map(l => l.model), ['a:latest', 'b:latest', 'c:latest', 'a:latest'])
  ps = await ollama.ps()
  t.ok(Date.parse(String(ps.models.find(m => m.name === 'a:latest')?.expires_at)) > Date.now() + 100 * 365 * 86_400_000, 'keep_alive -1: never expires')
  const unload = await ollama.chat({ model: 'a', messages: [], keep_alive: 0 })
  t.match(unload, { done: true, done_reason: 'unload' })
  t.notOk(sim.resident().includes('a:latest'), 'unloaded')
  t.equal(sim.loads.length, 4, 'unloading loads nothing')

  // keep_alive on a real request: expires that long after it ends
  await ollama.generate({ model: 'c', prompt: 'x', keep_alive: '150ms' })
  t.ok(sim.resident().includes('c:latest'))
  await sleep(250)
  t.notOk(sim.resident().includes('c:latest'), 'expired after its keep_alive')
})

t.test('simulators sharing a recorder: concurrent requests on one GPU overlap, sequential ones do not', async t => {
  const recorder = new GpuRecorder()
  const s1 = await startSimulator({ gpuIds: ['gpu0'], recorder, tokenDelayMs: 20 })
  const s2 = await startSimulator({ gpuIds: ['gpu0'], recorder, tokenDelayMs: 20 })
  const s3 = await startSimulator({ gpuIds: ['gpu1'], recorder, tokenDelayMs: 20 })
  t.teardown(async () => { await Promise.all([s1.close(), s2.close(), s3.close()]) })
  const ollama = (s: Simulator): Ollama => new Ollama({ host: s.url })

  await Promise.all([ollama(s1).generate({ model: 'llama3.2', prompt: 'a' }), ollama(s2).generate({ model: 'llama3.2', prompt: 'b' })])
  await recorder.whenIdle()
  t.equal(recorder.overlaps.length, 1, 'two requests at once on gpu0')
  t.equal(recorder.overlaps[0].gpuId, 'gpu0')
  t.equal(recorder.overlaps[0].holders.length, 2)
  t.ok(recorder.overlaps[0].holders.every(h => h.includes('llama3.2')), 'labels name the model')
  t.not(recorder.overlaps[0].holders[0], recorder.overlaps[0].holders[1], 'labels are unique')
  t.equal(recorder.maxConcurrent, 2)

  recorder.reset()
  await ollama(s1).generate({ model: 'llama3.2', prompt: 'a' })
  await ollama(s2).chat({ model: 'llama3.2', messages: [{ role: 'user', content: 'b' }] })
  await ollama(s1).embed({ model: 'llama3.2', input: 'c' })
  await recorder.whenIdle()
  t.equal(recorder.overlaps.length, 0, 'sequential requests do not overlap')
  t.equal(recorder.maxConcurrent, 1)
  t.same(recorder.events.map(e => e.type), ['start', 'end', 'start', 'end', 'start', 'end'])
  t.equal(recorder.idleGaps('gpu0').length, 2)
  t.ok(recorder.idleGaps('gpu0').every(g => g >= 0))

  recorder.reset()
  const p = Promise.all([ollama(s1).generate({ model: 'llama3.2', prompt: 'a' }), ollama(s3).generate({ model: 'llama3.2', prompt: 'b' })])
  t.ok(await eventually(async () => recorder.busy().length === 2, 5000), 'both GPUs busy at once')
  t.same(recorder.busy().sort(), ['gpu0', 'gpu1'])
  await p
  await recorder.whenIdle()
  t.equal(recorder.overlaps.length, 0, 'different GPUs do not overlap')
  t.equal(recorder.maxConcurrent, 2)

  // info routes are not work
  recorder.reset()
  await fetch(s1.url + '/api/tags')
  t.equal(recorder.events.length, 0)

  // a client that gives up ends the work
  const ac = new AbortController()
  const res = await fetch(s1.url + '/api/generate', { method: 'POST', body: JSON.stringify({ model: 'llama3.2', prompt: 'x' }), signal: ac.signal })
  t.same(recorder.busy(), ['gpu0'])
  ac.abort()
  await res.text().catch(() => {})
  await recorder.whenIdle(1000)
  t.same(recorder.events.map(e => e.type), ['start', 'end'])
})

t.test('behaviours', async t => {
  // each subtest its own server: no behaviour, recorder or residency leaks from one to the next
  const fresh = async (t: Test, opts: SimulatorOptions = {}): Promise<{ sim: Simulator, ollama: Ollama }> => {
    const sim = await startSimulator({ tokenDelayMs: 5, ...opts })
    t.teardown(sim.close)
    return { sim, ollama: new Ollama({ host: sim.url }) }
  }

  t.test('die-mid-stream truncates and drops the connection', async t => {
    const { sim, ollama } = await fresh(t)
    sim.behaviour = { kind: 'die-mid-stream', afterLines: 2 }
    const res = await post(sim, '/api/generate', { model: 'llama3.2', prompt: 'x' })
    t.equal(res.status, 200)
    const got: string[] = []
    const reader = res.body!.getReader()
    const dec = new TextDecoder()
    const err = await (async () => {
      for (;;) {
        const { done, value } = await reader.read()
        if (done) return null
        got.push(dec.decode(value))
      }
    })().catch((e: unknown) => e)
    t.ok(err instanceof Error, `the body read fails (${String(err)})`)
    t.equal(got.join('').split('\n').filter(Boolean).length, 2, 'two lines arrived')

    await t.rejects(async () => {
      for await (const part of await ollama.generate({ model: 'llama3.2', prompt: 'x', stream: true })) void part
    }, 'the ollama client fails')

    const nonStream = await post(sim, '/api/chat', { model: 'llama3.2', messages: [{ role: 'user', content: 'x' }], stream: false })
    await t.rejects(nonStream.text(), 'a non-streamed body is cut short too')
    await sim.recorder.whenIdle(1000)
  })

  t.test('stall-headers holds the request without a status line', async t => {
    const { sim, ollama } = await fresh(t)
    sim.behaviour = { kind: 'stall-headers' }
    let gotResponse = false
    const req = http.request({ host: '127.0.0.1', port: sim.port, method: 'POST', path: '/api/chat', agent: false }, () => { gotResponse = true })
    req.on('error', () => {})
    req.end(JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: 'x' }] }))
    await sleep(150)
    t.equal(gotResponse, false, 'no headers after 150 ms')
    t.same(sim.recorder.busy(), [sim.host], 'the GPU is busy meanwhile')
    req.destroy()
    await sim.recorder.whenIdle(1000)
    t.pass('the work ends when the client closes')
    await t.rejects(fetch(sim.url + '/api/generate', { method: 'POST', body: '{"model":"llama3.2","prompt":"x"}', signal: AbortSignal.timeout(100) }))
    await sim.recorder.whenIdle(1000)
  })

  t.test('slow-body sends some lines then goes quiet', async t => {
    const { sim, ollama } = await fresh(t)
    sim.behaviour = { kind: 'slow-body', afterLines: 1 }
    const res = await post(sim, '/api/generate', { model: 'llama3.2', prompt: 'x' }).catch(() => null)
    t.ok(res)
    const reader = res!.body!.getReader()
    const first = await reader.read()
    t.match(new TextDecoder().decode(first.value), /"done":false/)
    const next = await Promise.race([reader.read().then(() => 'data'), sleep(150).then(() => 'silence')])
    t.equal(next, 'silence')
    t.equal(sim.recorder.busy().length, 1)
    await reader.cancel()
    await sim.recorder.whenIdle(1000)
  })

  t.test('error answers with the given status and body', async t => {
    const { sim, ollama } = await fresh(t)
    sim.behaviour = { kind: 'error', status: 503, body: { error: 'server busy, please try again.  maximum pending requests exceeded' } }
    const err = await ollama.chat({ model: 'llama3.2', messages: [{ role: 'user', content: 'x' }] }).catch((e: unknown) => e) as any
    t.equal(err?.status_code, 503)
    t.match(err?.error, /server busy/)
    t.equal((await fetch(sim.url + '/api/version')).status, 200, 'info routes are not affected')
    sim.behaviour = { kind: 'error-mid-stream', afterLines: 2, message: 'model runner has unexpectedly stopped' }
    await t.rejects(async () => {
      for await (const part of await ollama.generate({ model: 'llama3.2', prompt: 'x', stream: true })) void part
    }, /unexpectedly stopped/, 'error-mid-stream: the client throws on the error line')
  })

  t.test('framing as Go sends it: chunked over 2 KB, Content-Length under it; a cut inside a chunked JSON answer', async t => {
    const { sim } = await fresh(t, { models: ['llama3.2', 'nomic-embed-text'] })
    const body = (o: unknown): string => JSON.stringify(o)
    let r = await raw(sim, 'POST', '/api/generate', {}, body({ model: 'llama3.2', prompt: 'x', stream: false }))
    const gen = JSON.parse(r.body.toString())
    t.ok(gen.context.length >= 256 && gen.context.every(Number.isInteger), `context of ${gen.context.length as number} ints`)
    t.ok(r.body.length > 2048, `${r.body.length} bytes`)
    t.equal(r.headers['transfer-encoding'], 'chunked', 'a generate answer over 2 KB is chunked')
    t.equal(r.headers['content-length'], undefined)
    r = await raw(sim, 'POST', '/api/embed', {}, body({ model: 'nomic-embed-text', input: 'x' }))
    t.equal(r.headers['transfer-encoding'], 'chunked', 'so is every embedding')
    t.equal(JSON.parse(r.body.toString()).embeddings[0].length, 768)
    r = await raw(sim, 'POST', '/api/chat', {}, body({ model: 'llama3.2', messages: [{ role: 'user', content: 'x' }], stream: false }))
    t.equal(r.headers['content-length'], String(r.body.length), 'a short answer has a Content-Length')
    r = await raw(sim, 'POST', '/api/generate', {}, body({ model: 'nope', prompt: 'x' }))
    t.equal(r.headers['content-length'], String(r.body.length), 'so has an error')

    sim.behaviour = { kind: 'die-mid-stream', afterLines: 1 }
    const cut = await post(sim, '/api/generate', { model: 'llama3.2', prompt: 'x', stream: false })
    t.equal(cut.headers.get('transfer-encoding'), 'chunked')
    t.equal(cut.headers.get('content-type'), 'application/json; charset=utf-8')
    await t.rejects(cut.text(), 'the chunked answer is cut short')
  })

  t.test('a cut inside a line (midLine)', async t => {
    const { sim } = await fresh(t)
    sim.behaviour = { kind: 'die-mid-stream', afterLines: 2, midLine: true }
    const res = await post(sim, '/api/generate', { model: 'llama3.2', prompt: 'x' })
    let text = ''
    const reader = res.body!.getReader()
    const err = await (async () => {
      for (;;) {
        const { done, value } = await reader.read()
        if (done) return null
        text += new TextDecoder().decode(value)
      }
    })().catch((e: unknown) => e)
    t.ok(err instanceof Error, 'the body read fails')
    const lines = text.split('\n')
    t.equal(lines.length, 3, 'two whole lines and a piece')
    t.ok(lines[2].length > 0 && lines[2].startsWith('{'), `the last piece is half a line: ${lines[2]}`)
    t.throws(() => JSON.parse(lines[2]))
  })

  t.test('a cancelled request keeps its GPU until the server notices (cancelDelayMs)', async t => {
    const { sim } = await fresh(t, { tokens: 50, tokenDelayMs: 10, cancelDelayMs: 150, resident: ['llama3.2'] })
    const ac = new AbortController()
    const res = await fetch(sim.url + '/api/generate', { method: 'POST', body: '{"model":"llama3.2","prompt":"x"}', signal: ac.signal })
    await res.body!.getReader().read()
    const cancelled = performance.now()
    ac.abort()
    await sleep(60)
    t.equal(sim.recorder.active(), 1, 'still busy 60 ms after the client left')
    await sim.recorder.whenIdle(2000)
    const held = performance.now() - cancelled
    t.ok(held >= 140, `the GPU was held ${held.toFixed(0)} ms after the cancel`)
    t.equal(sim.running(), 0, 'the runner slot is free again')
    // on by default, in every suite's simulators: Ollama's runner notices at its next token, the
    // diffusion pipeline when its image is done
    t.equal((await fresh(t)).sim.cancelDelayMs, 5, 'an Ollama simulator: its token delay')
    const sd = await startDiffusionSimulator({ imageDelayMs: 30 })
    t.teardown(sd.close)
    t.equal(sd.cancelDelayMs, 30, 'a diffusion simulator: its image delay')
  })
})

t.test('close() does not hang on keep-alive or stalled connections', async t => {
  const sim = await startSimulator()
  await (await fetch(sim.url + '/api/tags')).text() // undici keeps the connection alive
  t.ok(sim.activeConnections() >= 1)
  sim.behaviour = { kind: 'stall-headers' }
  const stalled = post(sim, '/api/generate', { model: 'llama3.2', prompt: 'x' }).catch((e: unknown) => e)
  await sleep(30)
  const t0 = performance.now()
  await sim.close()
  t.ok(performance.now() - t0 < 500, 'closed promptly')
  t.equal(sim.activeConnections(), 0)
  t.ok(await stalled instanceof Error, 'the stalled client sees an error')
  await sim.recorder.whenIdle(1000)
  await sim.close() // twice is fine
})

/** Parses a PNG by hand (independently of readPng): IHDR fields and the inflated IDAT. */
function decodePng (buf: Buffer): { width: number, height: number, colorType: number, inflated: Buffer } {
  let pos = 8
  let width = 0
  let height = 0
  let colorType = -1
  const idat: Buffer[] = []
  while (pos < buf.length) {
    const len = buf.readUInt32BE(pos)
    const type = buf.toString('ascii', pos + 4, pos + 8)
    const data = buf.subarray(pos + 8, pos + 8 + len)
    if (type === 'IHDR') {
      width = data.readUInt32BE(0)
      height = data.readUInt32BE(4)
      colorType = data[9]
    }
    if (type === 'IDAT') idat.push(data)
    pos += 12 + len
  }
  return { width, height, colorType, inflated: zlib.inflateSync(Buffer.concat(idat)) }
}

t.test('Stable Diffusion: txt2img, upload + img2img, FastAPI errors, serialisation', async t => {
  const recorder = new GpuRecorder()
  const sd = await startDiffusionSimulator({ gpuIds: ['sd0'], recorder, imageDelayMs: 40 })
  t.teardown(sd.close)

  let res = await post(sd, '/txt2img', { prompt: 'a red fox', num_inference_steps: 4, model: 'sdxl-turbo' })
  t.equal(res.status, 200)
  t.equal(res.headers.get('content-type'), 'image/png')
  t.match(res.headers.get('content-disposition'), /^attachment; filename=[0-9a-f-]{36}\.png$/)
  const png = Buffer.from(await res.arrayBuffer())
  t.same(png.subarray(0, 8), PNG_SIGNATURE)
  const d = decodePng(png)
  t.same([d.width, d.height, d.colorType], [8, 8, 2])
  t.equal(d.inflated.length, 8 * (1 + 8 * 3), 'IDAT inflates to 8 rows of filter byte + 8 RGB pixels')
  t.same(readPng(png).pixels, d.inflated, 'readPng agrees and the CRCs check out')
  const again = Buffer.from(await (await post(sd, '/txt2img', { prompt: 'a red fox' })).arrayBuffer())
  t.same(readPng(again).pixels, d.inflated, 'same prompt, same picture')
  // keys the server does not know are ignored, width and height among them (what OpenAI's size becomes)
  const sized = await post(sd, '/txt2img', { prompt: 'a red fox', width: 512, height: 768, seed: 7 })
  t.equal(sized.status, 200, 'unknown keys: no 422')
  const sizedPng = readPng(Buffer.from(await sized.arrayBuffer()))
  t.same([sizedPng.width, sizedPng.height], [8, 8], 'width/height change nothing')
  t.same(sizedPng.pixels, d.inflated, 'the same picture as without them')
  const other = Buffer.from(await (await post(sd, '/txt2img', { prompt: 'a blue whale' })).arrayBuffer())
  t.notSame(readPng(other).pixels, d.inflated, 'other prompt, other picture')

  res = await post(sd, '/txt2img', { num_inference_steps: 4 })
  t.equal(res.status, 422)
  t.same(await res.json(), { detail: [{ type: 'missing', loc: ['body', 'prompt'], msg: 'Field required', input: { num_inference_steps: 4 } }] })
  res = await post(sd, '/txt2img', '{"prompt": ')
  t.equal(res.status, 422)
  t.match(await res.json(), { detail: [{ type: 'json_invalid', loc: ['body', Number], msg: 'JSON decode error' }] })
  res = await post(sd, '/txt2img', { prompt: 'x', num_inference_steps: 'many' })
  t.match(await res.json(), { detail: [{ type: 'int_parsing', loc: ['body', 'num_inference_steps'] }] })
  res = await fetch(sd.url + '/nope')
  t.equal(res.status, 404)
  t.same(await res.json(), { detail: 'Not Found' })
  res = await fetch(sd.url + '/txt2img')
  t.equal(res.status, 405)
  t.same(await res.json(), { detail: 'Method Not Allowed' })

  const form = new FormData()
  form.append('file', new Blob([png], { type: 'image/png' }), 'fox.png')
  res = await fetch(sd.url + '/upload', { method: 'POST', body: form })
  t.equal(res.status, 200)
  const { file_id: fileId } = await res.json() as { file_id: string }
  t.match(fileId, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/)
  t.same(sd.uploads.get(fileId)?.data, png, 'the uploaded bytes are stored intact')
  t.equal(sd.uploads.get(fileId)?.filename, 'fox.png')
  res = await post(sd, '/img2img', { prompt: 'a red fox, oil painting', file_id: fileId, num_inference_steps: 4, strength: 0.5 })
  t.equal(res.status, 200)
  t.equal(res.headers.get('content-type'), 'image/png')
  t.equal(readPng(Buffer.from(await res.arrayBuffer())).width, 8)
  res = await post(sd, '/img2img', { prompt: 'x', file_id: 'no-such-file' })
  t.equal(res.status, 404)
  t.same(await res.json(), { detail: 'File not found' })
  res = await post(sd, '/img2img', { prompt: 'x' })
  t.match(await res.json(), { detail: [{ type: 'missing', loc: ['body', 'file_id'] }] })
  const empty = new FormData()
  empty.append('other', 'x')
  res = await fetch(sd.url + '/upload', { method: 'POST', body: empty })
  t.equal(res.status, 422)
  t.match(await res.json(), { detail: [{ type: 'missing', loc: ['body', 'file'] }] })

  // one image at a time
  await recorder.whenIdle()
  recorder.reset()
  const t0 = performance.now()
  const ends = await Promise.all([1, 2, 3].map(async i => {
    const r = await post(sd, '/txt2img', { prompt: `p${i}` })
    await r.arrayBuffer()
    return performance.now() - t0
  }))
  t.ok(Math.max(...ends) >= 3 * 40 - 5, `three images take three slots (${Math.max(...ends).toFixed(0)} ms)`)
  await recorder.whenIdle()
  t.ok(recorder.overlaps.length >= 1, 'concurrent requests to one SD server are recorded as overlapping on its GPU')
  t.ok(recorder.events.every(e => e.gpuIds[0] === 'sd0'))

  // die-mid-stream on an image: the body is cut short
  sd.behaviour = { kind: 'die-mid-stream', afterLines: 1 }
  res = await post(sd, '/txt2img', { prompt: 'x' })
  t.equal(res.status, 200)
  await t.rejects(res.arrayBuffer(), 'truncated PNG')
  sd.behaviour = { kind: 'error', status: 500, body: { detail: 'CUDA out of memory' } }
  res = await post(sd, '/txt2img', { prompt: 'x' })
  t.equal(res.status, 500)
  t.same(await res.json(), { detail: 'CUDA out of memory' })
  sd.behaviour = { kind: 'normal' }
  await recorder.whenIdle()
})
