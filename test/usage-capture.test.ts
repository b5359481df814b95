// Usage captured from the answers (CONTRACT 17): every API family, streamed and not, through real
// clients on two replicas, per key; the counts compared with what the simulated Ollama itself
// reports (its cost model: sim.costs()). A stream the client aborts counts what was served.
import t from 'tap'
import { Ollama } from 'ollama'
import OpenAI from 'openai'
import Anthropic from '@anthropic-ai/sdk'
import { startFleet, type Gateway } from './helpers/gateway.js'
import { insertKey, eventually } from './helpers/api-keys.js'
import type { Simulator } from './helpers/upstream-simulator.js'

const TOKEN = 'usage-capture-admin'
const MODEL = 'llama3:8b'

type Row = Record<string, string | number>

async function usageRows (gw: Gateway, groupBy: string): Promise<Row[]> {
  const res = await fetch(`${gw.url}/admin/usage?groupBy=${groupBy}`, { headers: { authorization: `Bearer ${TOKEN}` } })
  if (res.status !== 200) throw new Error(`GET /admin/usage answered ${res.status}: ${await res.text()}`)
  return ((await res.json()) as { rows: Row[] }).rows
}

const rowOf = async (gw: Gateway, client: string): Promise<Row | undefined> =>
  (await usageRows(gw, 'client')).find((r) => r.client === client)

interface Expected { requests: number, promptTokens: number, cachedPromptTokens: number, outputTokens: number, errors: number }
const zero = (): Expected => ({ requests: 0, promptTokens: 0, cachedPromptTokens: 0, outputTokens: 0, errors: 0 })

const clientsFor = (url: string, secret: string): { ollama: Ollama, openai: OpenAI, anthropic: Anthropic } => ({
  ollama: new Ollama({ host: url, headers: { Authorization: `Bearer ${secret}` } }),
  openai: new OpenAI({ baseURL: url + '/v1', apiKey: secret, maxRetries: 0 }),
  // Bearer, as the gateway's keys are sent (the SDK's authToken)
  anthropic: new Anthropic({ baseURL: url, apiKey: null, authToken: secret, maxRetries: 0 })
})

/** The costed requests the simulator recorded since `from` (its own counts of each). */
function costsSince (sim: Simulator, from: number): { promptTokens: number, cachedPromptTokens: number, outputTokens: number, n: number } {
  const records = sim.costs().requests.slice(from)
  return {
    promptTokens: records.reduce((n, r) => n + r.promptTokens, 0),
    cachedPromptTokens: records.reduce((n, r) => n + r.cachedTokens, 0),
    outputTokens: records.reduce((n, r) => n + r.evalCount, 0),
    n: records.length
  }
}

t.test('every API family, streamed and not, counted exactly per key on two replicas', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    migrate: true,
    upstreams: [{ model: MODEL, gpus: [0], simulator: { cost: { prefillMsPerToken: 0.05, decodeMsPerToken: 1, answerTokens: 6 } } }],
    options: { ADMIN_TOKEN: TOKEN }
  })
  const sim = fleet.upstreams[0]
  await insertKey(fleet.db.query, 'team-a', 'secret-team-a')
  await insertKey(fleet.db.query, 'team-b', 'secret-team-b')
  const replicas = [await fleet.replica(), await fleet.replica()]
  const expected: Record<string, Expected> = { 'team-a': zero(), 'team-b': zero() }

  /** Runs one request and adds what the simulator counted for it (or, for embeddings, what the answer says). */
  const counted = async (key: string, fn: () => Promise<Partial<Expected> | undefined>): Promise<void> => {
    const before = sim.costs().requests.length
    const own = await fn()
    const costs = costsSince(sim, before)
    const e = expected[key]
    e.requests++
    e.promptTokens += costs.promptTokens + (own?.promptTokens ?? 0)
    e.cachedPromptTokens += costs.cachedPromptTokens
    e.outputTokens += costs.outputTokens
    e.errors += own?.errors ?? 0
  }

  const conversation = [{ role: 'user', content: 'Tell me about the moon and its phases, in one short sentence please.' }]
  for (const [i, key] of ['team-a', 'team-b'].entries()) {
    for (const [r, gw] of replicas.entries()) {
      const { ollama, openai, anthropic } = clientsFor(gw.url, `secret-${key}`)
      const label = `${key} on replica ${r + 1}`
      // Ollama: non-streamed and streamed (the final line's counts), the same conversation twice: cached tokens
      await counted(key, async () => { await ollama.chat({ model: MODEL, messages: conversation, stream: false }); return undefined })
      await counted(key, async () => {
        const parts = await ollama.chat({ model: MODEL, messages: conversation, stream: true })
        for await (const _ of parts) { /* read to the end */ }
        return undefined
      })
      await counted(key, async () => {
        const parts = await ollama.generate({ model: MODEL, prompt: `Count to ${i + r + 3}.`, stream: true })
        for await (const _ of parts) { /* read to the end */ }
        return undefined
      })
      await counted(key, async () => {
        const res = await ollama.embed({ model: MODEL, input: ['one sentence', 'and another one'] })
        return { promptTokens: res.prompt_eval_count }
      })
      // OpenAI: chat and completions, streamed with the usage the client asks for, embeddings
      await counted(key, async () => { await openai.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: `hello from ${label}` }] }); return undefined })
      await counted(key, async () => {
        const stream = await openai.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: `stream to ${label}` }], stream: true, stream_options: { include_usage: true } })
        for await (const _ of stream) { /* read to the end */ }
        return undefined
      })
      await counted(key, async () => { await openai.completions.create({ model: MODEL, prompt: `complete this for ${label}` }); return undefined })
      await counted(key, async () => {
        const stream = await openai.completions.create({ model: MODEL, prompt: `stream this for ${label}`, stream: true, stream_options: { include_usage: true } })
        for await (const _ of stream) { /* read to the end */ }
        return undefined
      })
      await counted(key, async () => {
        const res = await openai.embeddings.create({ model: MODEL, input: `embed ${label}` })
        return { promptTokens: res.usage.prompt_tokens }
      })
      // Responses, non-streamed and streamed (response.completed's usage)
      await counted(key, async () => { await openai.responses.create({ model: MODEL, input: `respond to ${label}` }); return undefined })
      await counted(key, async () => {
        const stream = await openai.responses.create({ model: MODEL, input: `respond in a stream to ${label}`, stream: true })
        for await (const _ of stream) { /* read to the end */ }
        return undefined
      })
      // Anthropic, non-streamed and streamed (message_start's input, message_delta's output)
      await counted(key, async () => { await anthropic.messages.create({ model: MODEL, max_tokens: 20, messages: [{ role: 'user', content: `hi from ${label}` }] }); return undefined })
      await counted(key, async () => {
        const stream = await anthropic.messages.create({ model: MODEL, max_tokens: 20, messages: [{ role: 'user', content: `stream from ${label}` }], stream: true })
        for await (const _ of stream) { /* read to the end */ }
        return undefined
      })
      // An upstream-made error after admission: counted as a request and an error
      await counted(key, async () => {
        const err = await openai.chat.completions.create({ model: MODEL, messages: [] }).catch((e: unknown) => e)
        t.ok(err instanceof OpenAI.BadRequestError, "the upstream's 400 passes through")
        return { errors: 1 }
      })
    }
  }
  t.ok(expected['team-a'].cachedPromptTokens > 0, 'the simulator served cached prompt tokens (the repeated conversation)')

  // Recorded when each exchange ended (the lease released): read on either replica, at once.
  for (const gw of replicas) {
    for (const key of ['team-a', 'team-b']) {
      let row: Row | undefined
      await eventually(async () => { row = await rowOf(gw, key); return row?.requests === expected[key].requests }, 5000)
      t.same({
        requests: row?.requests,
        promptTokens: row?.promptTokens,
        cachedPromptTokens: row?.cachedPromptTokens,
        outputTokens: row?.outputTokens,
        errors: row?.errors
      }, expected[key], `${key}: the simulator's counts, as read on ${gw.url}`)
      t.ok(Number(row?.gpuSeconds) > 0, `${key}: GPU-seconds held are counted`)
    }
  }
  const byAssignment = await usageRows(replicas[0], 'assignment')
  t.same(byAssignment.map((r) => r.assignment), [`${MODEL}-1`], 'counted for the assignment that served them')

  // A streamed OpenAI answer the client asked no usage for says nothing: the request is counted, no tokens.
  const { openai } = clientsFor(replicas[0].url, 'secret-team-a')
  const before = await rowOf(replicas[0], 'team-a')
  const stream = await openai.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'no usage asked' }], stream: true })
  for await (const _ of stream) { /* read to the end */ }
  let after: Row | undefined
  t.ok(await eventually(async () => { after = await rowOf(replicas[0], 'team-a'); return after?.requests === Number(before?.requests) + 1 }, 5000), 'counted')
  t.equal(after?.outputTokens, before?.outputTokens, 'no output tokens invented')
  t.equal(after?.promptTokens, before?.promptTokens, 'no prompt tokens invented')
})

t.test('an aborted stream counts what was served', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    migrate: true,
    // slow tokens: the client leaves long before the answer's end
    upstreams: [{ model: MODEL, gpus: [0], simulator: { cost: { prefillMsPerToken: 0.05, decodeMsPerToken: 40, answerTokens: 60 } } }],
    options: { ADMIN_TOKEN: TOKEN, UPSTREAM_CANCEL_GRACE_MS: 20 }
  })
  const sim = fleet.upstreams[0]
  await insertKey(fleet.db.query, 'leaver', 'secret-leaver')
  await insertKey(fleet.db.query, 'anthropic-leaver', 'secret-anthropic-leaver')
  const gw = await fleet.replica()

  // Ollama: no counts until the final line, so the token lines served are the output
  const { ollama } = clientsFor(gw.url, 'secret-leaver')
  const parts = await ollama.chat({ model: MODEL, messages: [{ role: 'user', content: 'Tell me a long story.' }], stream: true })
  let read = 0
  for await (const part of parts) {
    if (part.message.content !== '') read++
    if (read === 3) break
  }
  parts.abort()
  let row: Row | undefined
  t.ok(await eventually(async () => { row = await rowOf(gw, 'leaver'); return row?.requests === 1 }, 5000), 'the aborted request is counted')
  t.ok(Number(row?.outputTokens) >= 3, `at least the 3 tokens the client read (${String(row?.outputTokens)})`)
  t.ok(Number(row?.outputTokens) < 60, 'not the answer it never got')
  t.equal(row?.promptTokens, 0, 'Ollama states the prompt only on its final line, which never came')
  t.equal(row?.errors, 0, 'a client that leaves is not an error')

  // Anthropic: message_start stated the prompt: the last counts seen, and the deltas served
  const { anthropic } = clientsFor(gw.url, 'secret-anthropic-leaver')
  const before = sim.costs().requests.length
  const stream = await anthropic.messages.create({ model: MODEL, max_tokens: 60, messages: [{ role: 'user', content: 'Another long story.' }], stream: true })
  let deltas = 0
  for await (const event of stream) {
    if (event.type === 'content_block_delta') deltas++
    if (deltas === 2) break
  }
  stream.controller.abort()
  t.ok(await eventually(async () => { row = await rowOf(gw, 'anthropic-leaver'); return row?.requests === 1 }, 5000), 'counted')
  t.equal(row?.promptTokens, sim.costs().requests[before].promptTokens, "the prompt message_start stated (the simulator's own count)")
  t.ok(Number(row?.outputTokens) >= 2 && Number(row?.outputTokens) < 60, `the deltas served (${String(row?.outputTokens)})`)
})

t.test('images from diffusion answers; speech: audio seconds only when the answer states them', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    migrate: true,
    upstreams: [
      { model: 'sdxl', kind: 'diffusor', gpus: [0] },
      { model: 'tts-1', kind: 'speech', gpus: [1] }
    ],
    options: { ADMIN_TOKEN: TOKEN }
  })
  await insertKey(fleet.db.query, 'artist', 'secret-artist')
  const gw = await fleet.replica()
  const headers = { authorization: 'Bearer secret-artist', 'content-type': 'application/json' }
  const png = await fetch(`${gw.url}/txt2img`, { method: 'POST', headers, body: JSON.stringify({ model: 'sdxl', prompt: 'a cat' }) })
  t.equal(png.status, 200)
  await png.arrayBuffer()
  const openai = new OpenAI({ baseURL: gw.url + '/v1', apiKey: 'secret-artist', maxRetries: 0 })
  const generated = await openai.images.generate({ model: 'sdxl', prompt: 'two dogs', n: 2, response_format: 'b64_json' })
  t.equal(generated.data?.length, 2)
  const speech = await openai.audio.speech.create({ model: 'tts-1', input: 'Hello there.', voice: 'alloy' })
  await speech.arrayBuffer()
  let row: Row | undefined
  t.ok(await eventually(async () => { row = await rowOf(gw, 'artist'); return row?.requests === 3 }, 5000), 'three requests counted')
  t.equal(row?.images, 3, 'one image per diffusion answer, n for /v1/images/generations')
  t.equal(row?.audioSeconds, 0, 'synthesised audio states no duration: none counted')
  t.equal(row?.outputTokens, 0)
  t.ok(Number(row?.gpuSeconds) > 0)

  // What a transcription that states its length gives, and what no model output can fake.
  const { AnswerMeter } = await import('../services/usage/usage-capture.js')
  const transcription = new AnswerMeter('speech', 'application/json')
  transcription.chunk(Buffer.from('{"text":"hello","usage":{"type":"duration","seconds":12.5}}'))
  t.same(transcription.counts(true, 200), { audioSeconds: 12.5 })
  const verbose = new AnswerMeter('speech', 'application/json')
  verbose.chunk(Buffer.from('{"task":"transcribe","language":"english","duration":3.25,"text":"hi"}'))
  t.same(verbose.counts(true, 200), { audioSeconds: 3.25 })
  const forged = new AnswerMeter('openai', 'application/json')
  // (usage first here, so the content's spelling comes last and would win if it were read)
  forged.chunk(Buffer.from('{"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10},'))
  forged.chunk(Buffer.from('"choices":[{"message":{"content":"\\"completion_tokens\\":999999"}}]}'))
  t.same(forged.counts(true, 200), { promptTokens: 7, cachedPromptTokens: 0, outputTokens: 3 }, 'a count spelt inside the content is not read')
})
