// The other APIs clients speak to an Ollama fleet (issue 11): Anthropic's Messages API, OpenAI's
// Responses API and OpenAI's audio routes, through the official clients, under leases.
import t, { type Test } from 'tap'
import http from 'node:http'
import { setTimeout as sleep } from 'node:timers/promises'
import Anthropic from '@anthropic-ai/sdk'
import OpenAI, { toFile } from 'openai'
import { assertAllFree, startFleet, type TestFleet } from './helpers/gateway.js'
import { speechBytes, transcriptOf, type SpeechSimulator } from './helpers/upstream-simulator.js'

const anthropicFor = (url: string, fetchImpl?: typeof fetch): Anthropic => new Anthropic({ baseURL: url, apiKey: 'x', maxRetries: 0, fetch: fetchImpl })
const openaiFor = (url: string, fetchImpl?: typeof fetch): OpenAI => new OpenAI({ baseURL: url + '/v1', apiKey: 'x', maxRetries: 0, fetch: fetchImpl })

/** A fetch that keeps each JSON body the client sends, to compare with what reached the upstream. */
function recordingFetch (sent: string[]): typeof fetch {
  return async (input, init) => {
    if (typeof init?.body === 'string') sent.push(init.body)
    return await fetch(input, init)
  }
}

async function settled (t: Test, fleet: TestFleet, gw: { url: string }): Promise<void> {
  await fleet.recorder.whenIdle()
  await assertAllFree(t, gw)
  t.same(fleet.recorder.overlaps, [], 'no GPU ever held by two requests at once')
}

/** One GPU, one Ollama: every request must wait for the one before it. */
async function llmFleet (t: Test): Promise<TestFleet> {
  return await startFleet(t, { gpus: [1], upstreams: [{ model: 'qwen3', name: 'box', gpus: [0], simulator: { models: ['qwen3'], tokens: 4, tokenDelayMs: 15 } }] })
}

t.test('Anthropic Messages API: messages.create and messages.stream through the gateway, body unchanged, leased', async (t) => {
  const fleet = await llmFleet(t)
  const gw = await fleet.replica()
  const sim = fleet.upstreams[0]
  const sent: string[] = []
  const client = anthropicFor(gw.url, recordingFetch(sent))

  const message = await client.messages.create({ model: 'qwen3', max_tokens: 64, messages: [{ role: 'user', content: 'hello' }] })
  t.equal(message.type, 'message')
  t.equal(message.content[0].type, 'text')
  t.equal((message.content[0] as { text: string }).text, 'The sky is blue')
  t.equal(message.stop_reason, 'end_turn')
  const saw = sim.requests.at(-1)!
  t.equal(saw.path, '/v1/messages')
  t.equal(saw.rawBody, sent.at(-1), 'the body reached the upstream byte for byte')

  const stream = client.messages.stream({ model: 'qwen3', max_tokens: 3, messages: [{ role: 'user', content: 'hi' }] })
  const texts: string[] = []
  stream.on('text', (text) => texts.push(text))
  const final = await stream.finalMessage()
  t.same(texts, ['The', ' sky', ' is'], 'each delta its own event')
  t.equal(final.stop_reason, 'max_tokens')
  t.equal(sim.requests.at(-1)!.rawBody, sent.at(-1))

  // several at once on one GPU: one after the other
  const many = await Promise.all([1, 2, 3].map(async () => await client.messages.create({ model: 'qwen3', max_tokens: 8, messages: [{ role: 'user', content: 'x' }] })))
  t.equal(many.length, 3)
  t.equal(fleet.recorder.events.filter((e) => e.type === 'start').length, 5, 'every request was model work on the recorded GPU')
  await settled(t, fleet, gw)
})

t.test('Anthropic Messages API: gateway-made errors in Anthropic\'s format; a broken stream ends in an error event', async (t) => {
  const fleet = await llmFleet(t)
  const gw = await fleet.replica()
  const client = anthropicFor(gw.url)
  const missing = await client.messages.create({ model: 'nope', max_tokens: 8, messages: [{ role: 'user', content: 'x' }] }).catch((err: unknown) => err)
  t.ok(missing instanceof Anthropic.NotFoundError, 'the SDK raises NotFoundError')
  t.same((missing as InstanceType<typeof Anthropic.APIError>).error, { type: 'error', error: { type: 'not_found_error', message: "model 'nope' not found" } })
  const bad = await fetch(`${gw.url}/v1/messages`, { method: 'POST', body: '{"max_tokens":1}' })
  t.equal(bad.status, 400)
  t.same(await bad.json(), { type: 'error', error: { type: 'invalid_request_error', message: 'model is required' } })
  // the shared body rules hold here too: a case variant of model, a name over 256 characters
  for (const body of ['{"model":"qwen3","MODEL":"other","max_tokens":1,"messages":[]}', JSON.stringify({ model: 'q'.repeat(300), max_tokens: 1, messages: [] })]) {
    const refused = await fetch(`${gw.url}/v1/messages`, { method: 'POST', body })
    t.equal(refused.status, 400)
    t.match(await refused.json(), { type: 'error', error: { type: 'invalid_request_error', message: String } })
  }
  t.equal(fleet.upstreams[0].requests.length, 0, 'none of these reached the upstream')

  fleet.upstreams[0].behaviour = { kind: 'die-mid-stream', afterLines: 2 }
  const stream = client.messages.stream({ model: 'qwen3', max_tokens: 64, messages: [{ role: 'user', content: 'hi' }] })
  const texts: string[] = []
  stream.on('text', (text) => texts.push(text))
  const broken = await stream.finalMessage().catch((err: unknown) => err)
  t.ok(broken instanceof Anthropic.APIError, 'the SDK raises the error event')
  t.match((broken as Error).message, /upstream failed mid-stream/)
  t.same(texts, ['The'], 'what came before the break was delivered')
  fleet.upstreams[0].behaviour = { kind: 'normal' }
  await settled(t, fleet, gw)
})

t.test('OpenAI Responses API: responses.create, streamed and not', async (t) => {
  const fleet = await llmFleet(t)
  const gw = await fleet.replica()
  const sim = fleet.upstreams[0]
  const sent: string[] = []
  const client = openaiFor(gw.url, recordingFetch(sent))

  const response = await client.responses.create({ model: 'qwen3', input: 'hello' })
  t.equal(response.object, 'response')
  t.equal(response.status, 'completed')
  t.equal(response.output_text, 'The sky is blue')
  t.equal(sim.requests.at(-1)!.path, '/v1/responses')
  t.same(sim.requests.at(-1)!.body, { model: 'qwen3', input: 'hello' }, 'forwarded as sent')
  t.equal(sim.requests.at(-1)!.rawBody, sent.at(-1), 'the body reached the upstream byte for byte')

  const events: Array<{ type: string, sequence_number: number, delta?: string }> = []
  const stream = await client.responses.create({ model: 'qwen3', input: 'hello', stream: true })
  for await (const event of stream) events.push(event as typeof events[number])
  t.equal(events[0].type, 'response.created')
  t.equal(events.at(-1)!.type, 'response.completed')
  t.same(events.filter((e) => e.type === 'response.output_text.delta').map((e) => e.delta), ['The', ' sky', ' is', ' blue'])
  t.same(events.map((e) => e.sequence_number), events.map((_, i) => i), 'every event, in order')

  // a broken stream ends with the Responses API's error event
  sim.behaviour = { kind: 'die-mid-stream', afterLines: 3 }
  const types: string[] = []
  let last: Record<string, unknown> = {}
  for await (const event of await client.responses.create({ model: 'qwen3', input: 'hello', stream: true })) {
    types.push(event.type)
    last = event as unknown as Record<string, unknown>
  }
  sim.behaviour = { kind: 'normal' }
  t.equal(types.at(-1), 'error')
  t.match(last, { type: 'error', code: 'api_error', message: /upstream failed mid-stream/ })

  const missing = await client.responses.create({ model: 'nope', input: 'x' }).catch((err: unknown) => err)
  t.ok(missing instanceof OpenAI.NotFoundError)
  t.match((missing as InstanceType<typeof OpenAI.APIError>).error, { message: "model 'nope' not found", type: 'not_found_error' })
  await settled(t, fleet, gw)
})

t.test('Messages and Responses clients at once on one GPU, streamed and not: each waits its turn, no GPU overlap', async (t) => {
  const fleet = await llmFleet(t)
  const gw = await fleet.replica()
  const anthropic = anthropicFor(gw.url)
  const openai = openaiFor(gw.url)
  const streamedText = async (events: AsyncIterable<{ type: string, delta?: unknown }>): Promise<string> => {
    let text = ''
    for await (const e of events) if (e.type === 'response.output_text.delta') text += String(e.delta)
    return text
  }
  // started together: without the lease the one-GPU server would run them side by side (an overlap)
  const texts = await Promise.all([1, 2].flatMap(() => [
    anthropic.messages.create({ model: 'qwen3', max_tokens: 8, messages: [{ role: 'user', content: 'x' }] }).then((m) => (m.content[0] as { text: string }).text),
    anthropic.messages.stream({ model: 'qwen3', max_tokens: 8, messages: [{ role: 'user', content: 'x' }] }).finalText(),
    openai.responses.create({ model: 'qwen3', input: 'x' }).then((r) => r.output_text),
    openai.responses.create({ model: 'qwen3', input: 'x', stream: true }).then(streamedText)
  ]))
  t.same(texts, Array(8).fill('The sky is blue'), 'every client got its whole answer')
  t.equal(fleet.recorder.events.filter((e) => e.type === 'start').length, 8, 'all eight were model work on the recorded GPU')
  t.equal(fleet.recorder.peak(fleet.gpuIds[0]), 1, 'one at a time on the GPU')
  await settled(t, fleet, gw)
})

/** A speech server with a transcription and a text-to-speech model, one GPU each. */
async function speechFleet (t: Test, options = {}): Promise<TestFleet> {
  return await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'whisper-1', kind: 'speech', name: 'stt', gpus: [0], simulator: { tokenDelayMs: 30 } },
      { model: 'tts-1', kind: 'speech', name: 'tts', gpus: [1], simulator: { tokenDelayMs: 30 } }
    ],
    options
  })
}

t.test('speech: audio.transcriptions.create and audio.speech.create, leased on speech assignments', async (t) => {
  const fleet = await speechFleet(t)
  const gw = await fleet.replica()
  const [stt, tts] = fleet.upstreams
  const client = openaiFor(gw.url)
  const audio = Buffer.alloc(300_000, 7)

  const transcription = await client.audio.transcriptions.create({ model: 'whisper-1', file: await toFile(audio, 'talk.wav', { type: 'audio/wav' }), language: 'en' })
  t.equal(transcription.text, transcriptOf(audio), 'the whole file reached the server')
  const saw = stt.requests.at(-1)!
  t.equal(saw.path, '/v1/audio/transcriptions')
  t.match(saw.headers['content-type'], /^multipart\/form-data; boundary=/, 'the client\'s multipart type passed on')
  t.same(saw.body.fields, { model: 'whisper-1', language: 'en' })
  t.same(saw.body.files, [{ name: 'file', filename: 'talk.wav', contentType: 'audio/wav', size: audio.length }])

  const speech = await client.audio.speech.create({ model: 'tts-1', input: 'Hello from the fleet.', voice: 'alloy' })
  t.equal(speech.headers.get('content-type'), 'audio/mpeg')
  t.same(Buffer.from(await speech.arrayBuffer()), speechBytes('Hello from the fleet.'), 'the audio bytes unchanged')
  t.equal(tts.requests.at(-1)!.path, '/v1/audio/speech')

  // concurrent requests on each one-GPU server: one at a time
  await Promise.all([
    ...[1, 2, 3].map(async () => await client.audio.transcriptions.create({ model: 'whisper-1', file: await toFile(audio.subarray(0, 1000), 'a.wav') })),
    ...[1, 2, 3].map(async () => await (await client.audio.speech.create({ model: 'tts-1', input: 'again', voice: 'alloy' })).arrayBuffer())
  ])
  t.equal(fleet.recorder.events.filter((e) => e.type === 'start').length, 8, 'all of them model work on the recorded GPUs')

  // the model as a query parameter, for a client that sends the file first (its model field, after
  // the file, must name the same model: CONTRACT 18, what is checked is what is sent)
  const first = await client.audio.transcriptions.create({ file: await toFile(Buffer.from('x'), 'b.wav'), model: 'whisper-1' } as any, { query: { model: 'whisper-1' } })
  t.equal(first.text, transcriptOf(Buffer.from('x')))

  // the lease API hands out speech servers as before
  const reserved = await (await fetch(`${gw.url}/gpu/reserve`, { method: 'POST', body: JSON.stringify({ outputType: 'speech', model: 'whisper-1' }) })).json() as { name: string, port: number, gpuIds: string, leaseId: string }
  t.match(reserved, { name: 'stt', port: stt.port, gpuIds: fleet.gpuIds[0] })
  t.equal((await fetch(`${gw.url}/gpu/release`, { method: 'POST', body: JSON.stringify({ leaseId: reserved.leaseId }) })).status, 200)
  await settled(t, fleet, gw)
})

/** A chunked multipart upload written by hand: `head`, then (after `between`) `tail`. */
async function upload (url: string, head: Buffer, tail: Buffer, between: () => Promise<void>, boundary = 'XyZ'): Promise<{ status: number, body: string }> {
  return await new Promise((resolve, reject) => {
    const req = http.request(`${url}/v1/audio/transcriptions`, { method: 'POST', headers: { 'content-type': `multipart/form-data; boundary=${boundary}`, 'transfer-encoding': 'chunked' } }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }))
    })
    req.on('error', reject)
    req.write(head)
    between().then(() => req.end(tail), reject)
  })
}

const field = (name: string, value: string): string => `--XyZ\r\nContent-Disposition: form-data; name="${name}"\r\n\r\n${value}\r\n`
const fileHead = (size: number): string => `--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\nX-Size: ${size}\r\n\r\n`

t.test('speech: an upload streams through as it arrives (never held whole), bounded by BODY_LIMIT', async (t) => {
  const fleet = await speechFleet(t, { BODY_LIMIT: 100_000 })
  const gw = await fleet.replica()
  const stt = fleet.upstreams[0] as SpeechSimulator
  const file = Buffer.alloc(60_000, 3)
  const head = Buffer.concat([Buffer.from(field('model', 'whisper-1') + fileHead(file.length)), file.subarray(0, 20_000)])
  const tail = Buffer.concat([file.subarray(20_000), Buffer.from('\r\n--XyZ--\r\n')])
  // the rest is only sent once the speech server has the start: a gateway holding the upload would never finish
  const started = stt.uploadStarted()
  const res = await upload(gw.url, head, tail, async () => {
    await Promise.race([started, sleep(3000).then(() => { throw new Error('the upload did not reach the server before it ended') })])
  })
  t.equal(res.status, 200)
  t.same(JSON.parse(res.body), { text: transcriptOf(file) })

  // file first and no ?model=: the gateway cannot know the model without holding the file
  const firstFile = await upload(gw.url, Buffer.from(fileHead(5) + 'abcde\r\n'), Buffer.from(field('model', 'whisper-1') + '--XyZ--\r\n'), async () => {})
  t.equal(firstFile.status, 400)
  t.match(JSON.parse(firstFile.body), { error: { message: /model is required: send the model field before the file/, type: 'invalid_request_error' } })

  // over BODY_LIMIT, chunked: cut off with 413
  const big = Buffer.alloc(150_000, 1)
  const tooBig = await upload(gw.url, Buffer.from(field('model', 'whisper-1') + fileHead(big.length)), Buffer.concat([big, Buffer.from('\r\n--XyZ--\r\n')]), async () => {})
  t.equal(tooBig.status, 413)
  t.match(JSON.parse(tooBig.body), { error: { message: /too large/ } })
  const unknown = await upload(gw.url, Buffer.from(field('model', 'nope') + fileHead(1) + 'a'), Buffer.from('\r\n--XyZ--\r\n'), async () => {})
  t.equal(unknown.status, 404)
  t.match(JSON.parse(unknown.body), { error: { type: 'not_found_error' } })
  await settled(t, fleet, gw)
})
