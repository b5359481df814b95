// OpenAI-compatible API and model discovery (issue 6), through the real `openai` client.
import t, { type Test } from 'tap'
import http from 'node:http'
import { setTimeout as sleep } from 'node:timers/promises'
import OpenAI from 'openai'
import { Ollama } from 'ollama'
import { modelKey } from '../services/fleet/model-name.js'
import { queueName } from '../services/leases/lease-store.js'
import { startFleet, type TestFleet } from './helpers/gateway.js'
import { redisClients } from './helpers/redis.js'
import { embedVector, makePng, readPng } from './helpers/upstream-simulator.js'

const clientFor = (url: string, fetchImpl?: typeof fetch): OpenAI =>
  new OpenAI({ baseURL: url + '/v1', apiKey: 'x', maxRetries: 0, fetch: fetchImpl })

/** Releases run just after a response ends: look again for a moment before reporting a held GPU. */
async function settled (t: Pick<Test, 'same'>, fleet: TestFleet): Promise<void> {
  await fleet.recorder.whenIdle()
  let held = await fleet.heldGpus()
  for (let i = 0; i < 40 && held.length > 0; i++) {
    await sleep(25)
    held = await fleet.heldGpus()
  }
  t.same(held, [], 'no GPU leased at the end')
  t.same(fleet.recorder.overlaps, [], 'no GPU ever held by two requests at once')
}

async function until (what: string, condition: () => boolean | Promise<boolean>): Promise<void> {
  const deadline = performance.now() + 5000
  while (!await condition()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(10)
  }
}

t.test('chat, completions and embeddings reach Ollama\'s /v1 routes with the body unchanged', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'm-small', gpus: [0], simulator: { models: ['m-small:latest'], tokens: 6, tokenDelayMs: 60 } }]
  })
  const gw = await fleet.replica()
  const sim = fleet.upstreams[0]
  const sent: string[] = []
  const client = clientFor(gw.url, async (input, init) => {
    if (typeof init?.body === 'string') sent.push(init.body)
    return await fetch(input, init)
  })
  const upstreamSaw = () => sim.requests.at(-1)!

  const chat = await client.chat.completions.create({ model: 'm-small', messages: [{ role: 'user', content: 'hello' }] })
  t.equal(chat.object, 'chat.completion')
  t.ok(chat.choices[0].message.content!.length > 0, 'an answer')
  t.equal(upstreamSaw().path, '/v1/chat/completions')
  t.equal(upstreamSaw().rawBody, sent.at(-1), 'the body reached the upstream byte for byte')
  t.notOk('stream' in upstreamSaw().body, 'no stream default added')
  t.notOk('keep_alive' in upstreamSaw().body, 'no keep_alive added')
  t.equal(upstreamSaw().headers.host, sim.host)

  const started = performance.now()
  const { data: stream, response } = await client.chat.completions
    .create({ model: 'M-Small:latest', messages: [{ role: 'user', content: 'hi' }], stream: true })
    .withResponse()
  t.match(response.headers.get('content-type'), /text\/event-stream/)
  t.equal(response.headers.get('x-maestro-assignment'), 'm-small-1')
  t.equal(response.headers.get('x-maestro-gpus'), fleet.gpuIds[0])
  const arrivals: number[] = []
  const parts: string[] = []
  for await (const chunk of stream) {
    arrivals.push(performance.now() - started)
    parts.push(chunk.choices[0]?.delta?.content ?? '')
  }
  t.equal(parts.filter((p) => p !== '').length, 6, 'six tokens, each its own event')
  t.ok(arrivals[0] < arrivals.at(-1)! - 250, `first event at ${Math.round(arrivals[0])} ms, last at ${Math.round(arrivals.at(-1)!)} ms`)
  t.equal(upstreamSaw().rawBody, sent.at(-1))
  t.equal(upstreamSaw().body.model, 'M-Small:latest', 'model string untouched')

  const completion = await client.completions.create({ model: 'm-small', prompt: 'The sky', max_tokens: 3 })
  t.equal(upstreamSaw().path, '/v1/completions')
  t.equal(completion.choices[0].finish_reason, 'length')
  t.ok(completion.choices[0].text.length > 0)
  t.equal(upstreamSaw().rawBody, sent.at(-1))

  // The client asks for base64 unless told otherwise, and decodes it itself.
  const packed = await client.embeddings.create({ model: 'm-small', input: ['a', 'b'] })
  t.equal(upstreamSaw().path, '/v1/embeddings')
  t.equal(upstreamSaw().body.encoding_format, 'base64')
  // 768: the simulator's default size (nomic-embed-text)
  t.same(packed.data.map((d) => Array.from(d.embedding)), [embedVector('a', 768), embedVector('b', 768)])
  const floats = await client.embeddings.create({ model: 'm-small', input: 'a', encoding_format: 'float' })
  t.equal(upstreamSaw().body.encoding_format, 'float')
  t.same(floats.data[0].embedding, embedVector('a', 768))
  t.equal(upstreamSaw().rawBody, sent.at(-1))

  await settled(t, fleet)
})

t.test('/v1/models lists what /api/tags lists, in OpenAI\'s format', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1],
    upstreams: [
      // this server also has other:7b, but only m-small is assigned to it
      { model: 'm-small', gpus: [0], simulator: { models: ['m-small:latest', 'other:7b'] } },
      { model: '*', gpus: [1], simulator: { models: ['alpha:latest', 'ns/beta:7b'] } },
      { model: 'sdxl', kind: 'diffusor', gpus: [2] }
    ]
  })
  const gw = await fleet.replica()
  const client = clientFor(gw.url)

  const list = await client.models.list()
  const ids = list.data.map((m) => m.id).sort()
  t.same(ids, ['alpha:latest', 'm-small:latest', 'ns/beta:7b'])
  const tags = await new Ollama({ host: gw.url }).list()
  t.same(tags.models.map((m) => m.name).sort(), ids, 'the same names as /api/tags')
  for (const m of list.data) {
    t.equal(m.object, 'model')
    t.ok(Number.isInteger(m.created) && m.created > 0, `${m.id} has a creation time`)
  }
  t.equal(list.data.find((m) => m.id === 'ns/beta:7b')?.owned_by, 'ns')
  t.equal(list.data.find((m) => m.id === 'alpha:latest')?.owned_by, 'library')
  const raw = await (await fetch(`${gw.url}/v1/models`)).json()
  t.same(Object.keys(raw).sort(), ['data', 'object'])
  t.equal(raw.object, 'list')

  t.match(await client.models.retrieve('ns/beta:7b'), { id: 'ns/beta:7b', object: 'model', owned_by: 'ns' })
  t.match(await client.models.retrieve('ALPHA'), { id: 'ALPHA', object: 'model' }, 'matched case-insensitively, :latest optional')
  const unencoded = await fetch(`${gw.url}/v1/models/ns/beta:7b`)
  t.equal(unencoded.status, 200, 'a slash need not be encoded')
  t.equal((await unencoded.json()).id, 'ns/beta:7b')

  for (const missing of ['other:7b', 'sdxl', 'nope']) {
    const err = await client.models.retrieve(missing).catch((e: unknown) => e)
    t.ok(err instanceof OpenAI.NotFoundError, `${missing}: NotFoundError`)
    t.same((err as InstanceType<typeof OpenAI.NotFoundError>).error,
      { message: `model '${missing}' not found`, type: 'not_found_error', param: null, code: null })
  }
  await settled(t, fleet)
})

t.test('image generation: n txt2img calls under one lease, answered as base64 PNGs', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [
      { model: 'sdxl', kind: 'diffusor', gpus: [0], simulator: { imageDelayMs: 150 } },
      { model: 'm', gpus: [0] }
    ]
  })
  const gw = await fleet.replica()
  const client = clientFor(gw.url)
  const [sd, llm] = fleet.upstreams
  const before = Math.floor(Date.now() / 1000)

  const images = client.images.generate({ model: 'sdxl', prompt: 'a red fox', n: 3, size: '512x768', num_inference_steps: 2 } as any).withResponse()
  await until('the first txt2img', () => sd.requests.length > 0)
  // Another model on the same GPU, asked while the images are being made: it must wait for all three.
  const chat = client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }] }).withResponse()
  const [{ data: generated, response }, { response: chatResponse }] = await Promise.all([images, chat])

  t.equal(response.headers.get('x-maestro-gpus'), fleet.gpuIds[0])
  t.ok(generated.created >= before && generated.created <= Math.floor(Date.now() / 1000) + 1, 'created in unix seconds')
  t.equal(generated.data!.length, 3)
  for (const image of generated.data!) {
    const png = Buffer.from(image.b64_json!, 'base64')
    t.equal(readPng(png).width, 8, 'a decodable PNG')
    t.ok(png.equals(makePng('a red fox')), 'the upstream\'s image, unaltered')
  }
  t.same(sd.requests.map((r) => [r.path, r.body]), Array(3).fill(['/txt2img',
    { model: 'sdxl', prompt: 'a red fox', num_inference_steps: 2, width: 512, height: 768 }]), 'size as width/height, extras kept')

  const work = fleet.recorder.events
  const lastImageEnd = work.filter((e) => e.type === 'end' && e.label.includes('/txt2img')).at(-1)!.at
  const chatStart = work.find((e) => e.type === 'start' && e.label.includes('/v1/chat/completions'))!.at
  t.ok(chatStart >= lastImageEnd, 'the chat started only after the third image: one lease covered all three')
  t.ok(Number(chatResponse.headers.get('x-maestro-queue-ms')) > 100, 'the chat waited in the queue')
  t.equal(llm.requests.length, 1)

  const err = await client.images.generate({ model: 'sdxl', prompt: 'x', response_format: 'url' }).catch((e: unknown) => e)
  t.ok(err instanceof OpenAI.BadRequestError, 'response_format url: BadRequestError')
  t.match((err as InstanceType<typeof OpenAI.BadRequestError>).error, { type: 'invalid_request_error', message: /'url' is not supported/ })
  t.equal(sd.requests.length, 3, 'refused before any upstream call')

  const one = await client.images.generate({ model: 'sdxl', prompt: 'one' })
  t.equal(one.data!.length, 1, 'n defaults to 1')
  t.notOk('width' in sd.requests.at(-1)!.body, 'no size: the server\'s default')

  // The server's own error passes through as it said it, and the lease ends with it.
  sd.behaviour = { kind: 'error', status: 500, body: { detail: 'CUDA out of memory' } }
  const failed = await fetch(`${gw.url}/v1/images/generations`, { method: 'POST', body: JSON.stringify({ model: 'sdxl', prompt: 'x', n: 2 }) })
  t.same({ status: failed.status, body: await failed.json() }, { status: 500, body: { detail: 'CUDA out of memory' } })
  t.equal(sd.requests.length, 5, 'no second call after a failed first')
  sd.behaviour = { kind: 'normal' }

  // A client that gives up mid-batch stops the batch and frees the GPU. (Plain node:http: after an
  // abort, fetch's pool opens a spare connection that would hold the gateway's close for 70 s.)
  const abandoned = http.request(`${gw.url}/v1/images/generations`, { method: 'POST', agent: false })
  const gone = new Promise((resolve) => abandoned.once('error', resolve))
  abandoned.end(JSON.stringify({ model: 'sdxl', prompt: 'many', n: 5 }))
  await until('the batch to start', () => sd.requests.length === 6)
  abandoned.destroy()
  await gone
  await settled(t, fleet)
  t.equal(sd.requests.length, 6, 'no further image once the client left')
  t.ok((await client.images.generate({ model: 'sdxl', prompt: 'after' })).data!.length === 1, 'the GPU is free for the next')
  await settled(t, fleet)
})

t.test('gateway-made errors on /v1 use OpenAI\'s envelope; an upstream\'s own errors pass through', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'm', gpus: [0], simulator: { tokens: 6 } },
      { model: 'sdxl', kind: 'diffusor', gpus: [1] }
    ]
  })
  const gw = await fleet.replica()
  const client = clientFor(gw.url)
  const notFound = (model: string) => ({ message: `model '${model}' not found`, type: 'not_found_error', param: null, code: null })

  const attempts: Array<[string, () => Promise<unknown>]> = [
    ['chat', async () => await client.chat.completions.create({ model: 'nope', messages: [{ role: 'user', content: 'x' }] })],
    ['completions', async () => await client.completions.create({ model: 'nope', prompt: 'x' })],
    ['embeddings', async () => await client.embeddings.create({ model: 'nope', input: 'x' })],
    ['images', async () => await client.images.generate({ model: 'nope', prompt: 'x' })]
  ]
  for (const [what, call] of attempts) {
    const err = await call().catch((e: unknown) => e)
    t.ok(err instanceof OpenAI.NotFoundError, `${what}: NotFoundError`)
    t.same((err as InstanceType<typeof OpenAI.NotFoundError>).error, notFound('nope'))
  }
  const wrongKind = await client.images.generate({ model: 'm', prompt: 'x' }).catch((e: unknown) => e)
  t.ok(wrongKind instanceof OpenAI.NotFoundError, 'an llm is not an image model')

  const post = async (path: string, body: string) => {
    const res = await fetch(gw.url + path, { method: 'POST', body, headers: { 'content-type': 'application/json' } })
    return { status: res.status, body: await res.json() }
  }
  const invalid = (message: string) => ({ error: { message, type: 'invalid_request_error', param: null, code: null } })
  const broken = await post('/v1/chat/completions', '{"model":')
  t.equal(broken.status, 400)
  t.match(broken.body, { error: { type: 'invalid_request_error', message: /invalid JSON/, param: null, code: null } })
  t.same(await post('/v1/chat/completions', '[1]'), { status: 400, body: invalid('request body must be a JSON object') })
  t.same(await post('/v1/embeddings', '{"input":"x"}'), { status: 400, body: invalid('model is required') })
  t.same(await post('/v1/completions', '{"model":""}'), { status: 400, body: invalid('model is required') })
  t.same(await post('/v1/images/generations', '{"prompt":"x"}'), { status: 400, body: invalid('model is required') })
  const noPrompt = await post('/v1/images/generations', '{"model":"sdxl"}')
  t.equal(noPrompt.status, 400)
  t.match(noPrompt.body, { error: { type: 'invalid_request_error', message: /prompt/ } })
  const badSize = await post('/v1/images/generations', '{"model":"sdxl","prompt":"x","size":"big"}')
  t.equal(badSize.status, 400)
  t.match(badSize.body, { error: { type: 'invalid_request_error', message: /size/ } })

  for (const [method, path] of [['GET', '/v1/nothing'], ['POST', '/v1/chat'], ['GET', '/v1/chat/completions']]) {
    const res = await fetch(gw.url + path, { method })
    t.same({ status: res.status, body: await res.json() },
      { status: 404, body: { error: { message: `no route ${method} ${path}`, type: 'not_found_error', param: null, code: null } } },
      `${method} ${path}: 404 in OpenAI's envelope`)
  }

  // The upstream's own refusal comes back as it said it.
  const empty = await client.chat.completions.create({ model: 'm', messages: [] }).catch((e: unknown) => e)
  t.ok(empty instanceof OpenAI.BadRequestError)
  t.match((empty as InstanceType<typeof OpenAI.BadRequestError>).error, { message: "[] is too short - 'messages'" })

  // An upstream that breaks off mid-stream: one SSE error event ends the stream.
  fleet.upstreams[0].behaviour = { kind: 'die-mid-stream', afterLines: 2 }
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST', body: JSON.stringify({ model: 'm', messages: [{ role: 'user', content: 'x' }], stream: true })
  })
  t.equal(res.status, 200)
  const events = (await res.text()).split('\n\n').filter((e) => e !== '')
  t.equal(events.length, 3, 'two events, then the error event')
  t.ok(events.every((e) => e.startsWith('data: ')))
  t.match(JSON.parse(events[2].slice('data: '.length)), { error: { message: /upstream failed mid-stream/, type: 'api_error', param: null, code: null } })
  const stream = await client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'x' }], stream: true })
  let received = 0
  const thrown = await (async () => { for await (const _ of stream) received++ })().catch((e: unknown) => e)
  t.equal(received, 2)
  t.ok(thrown instanceof OpenAI.APIError, 'the client throws on the error event')
  t.match((thrown as Error).message, /upstream failed mid-stream/)
  fleet.upstreams[0].behaviour = { kind: 'normal' }
  t.ok((await client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'x' }] })).choices[0].message.content)
  await settled(t, fleet)
})

t.test('a full queue answers 503 with Retry-After in OpenAI\'s envelope', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 40, tokenDelayMs: 50 } }],
    options: { QUEUE_MAX: 1 }
  })
  const gw = await fleet.replica()
  const client = clientFor(gw.url)

  // Hold the GPU with a slow stream (about two seconds).
  const slow = await client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'long' }], stream: true })
  const slowEvents = slow[Symbol.asyncIterator]()
  await slowEvents.next()
  // One waiter fills the queue...
  const waiting = client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'wait' }], max_tokens: 1 })
  waiting.catch(() => {}) // awaited below; a failure before then must not be unhandled
  const { client: redis } = await redisClients(t)
  const queueKey = `${fleet.prefix}qw:${queueName('llm', modelKey('m'))}`
  await until('the second request to queue', async () => await redis.zcard(queueKey) === 1)
  // ...and the next one is turned away.
  const err = await client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'x' }] }).catch((e: unknown) => e)
  t.ok(err instanceof OpenAI.InternalServerError, '503 reaches the client as an API error')
  const apiError = err as InstanceType<typeof OpenAI.InternalServerError>
  t.equal(apiError.status, 503)
  t.ok(Number(apiError.headers?.get('retry-after')) > 0, `Retry-After: ${apiError.headers?.get('retry-after')}`)
  t.match(apiError.error, { message: /queue for model 'm' is full/, type: 'api_error', param: null, code: null })

  // Read to the end rather than abort: an aborted fetch makes undici open a spare connection that
  // holds the gateway's close until Fastify's keep-alive timeout (72 s).
  while ((await slowEvents.next()).done !== true) { /* the stream's lease then goes to the waiter */ }
  const served = await waiting
  t.ok(served.choices[0].message.content, 'the waiter is served once the stream has ended')
  await settled(t, fleet)
})

t.test('/v1 and /api requests share the GPUs without ever overlapping', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'a', gpus: [0], simulator: { tokens: 4, tokenDelayMs: 15 } },
      { model: 'b', gpus: [0, 1], simulator: { tokens: 4, tokenDelayMs: 15 } },
      { model: 'c', gpus: [1], simulator: { tokens: 4, tokenDelayMs: 15 } }
    ]
  })
  const gw = await fleet.replica()
  const client = clientFor(gw.url)
  const ollama = new Ollama({ host: gw.url })
  const models = ['a', 'b', 'c']
  const messages = [{ role: 'user' as const, content: 'hi' }]

  const calls = Array.from({ length: 24 }, async (_, i): Promise<string> => {
    const model = models[i % 3]
    switch (i % 4) {
      case 0:
        return (await client.chat.completions.create({ model, messages })).choices[0].message.content ?? ''
      case 1: {
        let text = ''
        for await (const chunk of await client.chat.completions.create({ model, messages, stream: true })) text += chunk.choices[0]?.delta?.content ?? ''
        return text
      }
      case 2:
        return (await ollama.chat({ model, messages })).message.content
      default: {
        let text = ''
        for await (const part of await ollama.generate({ model, prompt: 'hi', stream: true })) text += part.response
        return text
      }
    }
  })
  const answers = await Promise.all(calls)
  t.ok(answers.every((a) => a.length > 0), 'every request answered')
  t.same(fleet.upstreams.map((u) => u.requests.length), [8, 8, 8], 'each served by its own upstream')
  t.same(fleet.upstreams.map((u) => new Set(u.requests.map((r) => r.path.startsWith('/v1/') ? 'v1' : 'api')).size), [2, 2, 2],
    'each upstream saw both APIs')
  await settled(t, fleet)
})
