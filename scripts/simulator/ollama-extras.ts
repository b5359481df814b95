/**
 * More of the simulated Ollama: the pull progress stream, and the Anthropic Messages
 * (`/v1/messages`) and OpenAI Responses (`/v1/responses`) APIs Ollama serves beside its own, as
 * their JSON answers and SSE event streams look on the wire (Ollama's `anthropic/` and
 * `openai/responses` middlewares). ollama.ts adds them to its routes.
 *
 * Messages and Responses requests are model work: they are recorded on the GPU recorder like
 * `/api/chat`. A pull is a download, no GPU work, so it is not recorded.
 */
import { createHash, randomBytes } from 'node:crypto'
import type { Simulator } from './http.js'
import type { OllamaRoute, OllamaRouteKit } from './ollama-kit.js'
import { chatTurns, responsesTurns } from './ollama-costs.js'

/** Parses a JSON object body; undefined (and the error answered) when it is not one. */
function jsonObject (kit: OllamaRouteKit, fail: (status: number, message: string) => void): Record<string, any> | undefined {
  let body: unknown
  try {
    body = JSON.parse(kit.ctx.text)
  } catch (err) {
    fail(400, `invalid JSON: ${(err as Error).message}`)
    return undefined
  }
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    fail(400, 'request body must be a JSON object')
    return undefined
  }
  return body as Record<string, any>
}

/** The routes this module adds to the Ollama simulator (see EXTRA_OLLAMA_ROUTES there). */
export const OLLAMA_EXTRA_ROUTES: OllamaRoute[] = [
  // a download, no GPU work: not recorded
  { method: 'POST', path: '/api/pull', work: false, handle: async (kit) => await pull(kit) },
  { method: 'POST', path: '/v1/messages', work: true, handle: async (kit) => await messages(kit) },
  { method: 'POST', path: '/v1/responses', work: true, handle: async (kit) => await responses(kit) }
]

// --- /api/pull

/** Blob digests a pull of `model` downloads: the model weights and a small params layer. */
function layersOf (key: string): Array<{ digest: string, size: number }> {
  const weights = createHash('sha256').update(`weights:${key}`).digest('hex')
  const params = createHash('sha256').update(`params:${key}`).digest('hex')
  return [{ digest: `sha256:${weights}`, size: 2_019_377_376 }, { digest: `sha256:${params}`, size: 487 }]
}

/** Simulators whose pulls fail, with the error Ollama gives (e.g. `pull model manifest: file does not exist`). */
const failingPulls = new WeakMap<Simulator, string>()

/** From now on, pulls on `sim` fail after `pulling manifest` with `message` (undefined: they succeed again). */
export function failPulls (sim: Simulator, message: string | undefined): void {
  if (message === undefined) failingPulls.delete(sim)
  else failingPulls.set(sim, message)
}

/** Pull requests whose connection is still open, per simulator. */
const openPulls = new WeakMap<Simulator, number>()

/** How many pulls `sim` has with a connection still open (a cancelled pull's closes at once). */
export function pullsOpen (sim: Simulator): number {
  return openPulls.get(sim) ?? 0
}

/**
 * Ollama's PullHandler: `pulling manifest`, per layer `pulling <12 hex>` lines with digest, total
 * and completed, `verifying sha256 digest`, `writing manifest`, `success`. A failure is a
 * `{"error"}` line (status staying 200); with `"stream": false`, one JSON answer at the end, 500
 * with `{"error"}` on failure. A pulled model is listed by /api/tags from then on.
 */
async function pull (kit: OllamaRouteKit): Promise<void> {
  const { st, ctx, ex, wire } = kit
  const { modelKey, sleep, JSON_TYPE, NDJSON_TYPE } = wire
  openPulls.set(ctx.sim, pullsOpen(ctx.sim) + 1)
  ctx.res.once('close', () => openPulls.set(ctx.sim, pullsOpen(ctx.sim) - 1))
  const json = (status: number, obj: unknown): void => ex.plain(status, { 'Content-Type': JSON_TYPE }, JSON.stringify(obj))
  const body = wire.bindNative(ex, ctx.text, 'api.PullRequest', { name: ['string', 'string'], insecure: ['bool', 'bool'] })
  if (body === undefined) return
  const model: string = body.model ?? body.name ?? ''
  if (model === '') return json(400, { error: 'model is required' })
  const failure = failingPulls.get(ctx.sim)
  const lines: Array<Record<string, unknown>> = [{ status: 'pulling manifest' }]
  if (failure === undefined) {
    for (const { digest, size } of layersOf(modelKey(model))) {
      const steps = size > 1000 ? 3 : 1
      for (let i = 1; i <= steps; i++) {
        lines.push({ status: `pulling ${digest.slice(7, 19)}`, digest, total: size, completed: Math.round(size * i / steps) })
      }
    }
    lines.push({ status: 'verifying sha256 digest' }, { status: 'writing manifest' })
  }
  const installed = (): void => { if (!st.models.some(m => modelKey(m) === modelKey(model))) st.models.push(model) }
  if (body.stream === false) {
    await sleep(st.tokenDelayMs * lines.length)
    if (failure !== undefined) return json(500, { error: failure })
    installed()
    return json(200, { status: 'success' })
  }
  if (!ex.beginStream(NDJSON_TYPE)) return
  for (const line of lines) {
    await sleep(st.tokenDelayMs)
    if (!ex.line(JSON.stringify(line) + '\n')) return
  }
  if (failure !== undefined) return ex.endStream(JSON.stringify({ error: failure }) + '\n')
  installed()
  ex.endStream(JSON.stringify({ status: 'success' }) + '\n')
}

// --- Anthropic Messages API

/** Ollama's `anthropic.NewError`: the error type follows the status. */
export function anthropicError (status: number, message: string): { type: 'error', error: { type: string, message: string }, request_id: string } {
  const type = status === 400
    ? 'invalid_request_error'
    : status === 401
      ? 'authentication_error'
      : status === 403
        ? 'permission_error'
        : status === 404 ? 'not_found_error' : status === 429 ? 'rate_limit_error' : status === 503 || status === 529 ? 'overloaded_error' : 'api_error'
  return { type: 'error', error: { type, message }, request_id: `req_${randomBytes(12).toString('hex')}` }
}

/** One SSE event with its name, as Ollama's anthropic and responses writers send them. */
const event = (name: string, data: unknown): string => `event: ${name}\ndata: ${JSON.stringify(data)}\n\n`

const messageId = (): string => `msg_${randomBytes(12).toString('hex')}`

async function messages (kit: OllamaRouteKit): Promise<void> {
  const { ex, known, wire } = kit
  const { sleep, promptTokens, JSON_TYPE, SSE_TYPE } = wire
  const fail = (status: number, message: string): void => ex.plain(status, { 'Content-Type': JSON_TYPE }, JSON.stringify(anthropicError(status, message)))
  const body = jsonObject(kit, (status, message) => fail(status, `Invalid request: ${message}`))
  if (body === undefined) return
  const model: string = body.model ?? ''
  if (model === '') return fail(400, 'model is required')
  if (typeof body.max_tokens !== 'number' || body.max_tokens <= 0) return fail(400, 'max_tokens is required and must be positive')
  const msgs: unknown[] = body.messages ?? []
  if (msgs.length === 0) return fail(400, 'messages is required')
  if (!known(model)) return fail(404, `model '${model}' not found`)
  if (!await kit.run(model, body)) return
  const { words, reason, tokenDelayMs, anthropicUsage } = await kit.answer(model, () => chatTurns(msgs, body.system), promptTokens(msgs), body.max_tokens)
  const stopReason = reason === 'length' ? 'max_tokens' : 'end_turn'
  const id = messageId()
  if (body.stream !== true) {
    await sleep(tokenDelayMs * words.length)
    return ex.send(200, { 'Content-Type': JSON_TYPE }, JSON.stringify({
      id, type: 'message', role: 'assistant', model, content: [{ type: 'text', text: words.join('') }], stop_reason: stopReason, usage: anthropicUsage(words.length)
    }))
  }
  if (!ex.beginStream(SSE_TYPE)) return
  const start = { id, type: 'message', role: 'assistant', model, content: [], usage: anthropicUsage(0) }
  if (!ex.line(event('message_start', { type: 'message_start', message: start }))) return
  for (const [i, w] of words.entries()) {
    await sleep(tokenDelayMs)
    const opening = i === 0 ? event('content_block_start', { type: 'content_block_start', index: 0, content_block: { type: 'text', text: '' } }) : ''
    if (!ex.line(opening + event('content_block_delta', { type: 'content_block_delta', index: 0, delta: { type: 'text_delta', text: w } }))) return
  }
  if (words.length > 0 && !ex.line(event('content_block_stop', { type: 'content_block_stop', index: 0 }))) return
  if (!ex.line(event('message_delta', { type: 'message_delta', delta: { stop_reason: stopReason }, usage: anthropicUsage(words.length) }))) return
  ex.endStream(event('message_stop', { type: 'message_stop' }))
}

// --- OpenAI Responses API

async function responses (kit: OllamaRouteKit): Promise<void> {
  const { ex, known, wire } = kit
  const { sleep, promptTokens, JSON_TYPE, SSE_TYPE } = wire
  const fail = (status: number, message: string): void => ex.plain(status, { 'Content-Type': JSON_TYPE }, JSON.stringify(wire.openAiError(status, message)))
  const body = jsonObject(kit, fail)
  if (body === undefined) return
  const model: string = body.model ?? ''
  if (model === '') return fail(400, 'model is required')
  const input: unknown = body.input
  if (input === undefined || input === null || input === '' || (Array.isArray(input) && input.length === 0)) return fail(400, 'input is required')
  if (!known(model)) return fail(404, `model '${model}' not found`)
  if (!await kit.run(model, body)) return
  const limit = typeof body.max_output_tokens === 'number' ? body.max_output_tokens : undefined
  const { words, reason, tokenDelayMs, promptTokens: inputTokens, cachedTokens, cost } = await kit.answer(model, () => responsesTurns(input, body.instructions), promptTokens(input), limit)
  const responseId = `resp_${randomBytes(12).toString('hex')}`
  const itemId = messageId()
  const createdAt = Math.floor(Date.now() / 1000)
  const text = words.join('')
  const part = (t: string): Record<string, unknown> => ({ type: 'output_text', text: t, annotations: [] })
  const item = (status: string, content: unknown[]): Record<string, unknown> => ({ id: itemId, type: 'message', status, role: 'assistant', content })
  const response = (status: string, output: unknown[], usage: unknown): Record<string, unknown> => ({
    id: responseId,
    object: 'response',
    created_at: createdAt,
    status,
    error: null,
    incomplete_details: reason === 'length' && status !== 'in_progress' ? { reason: 'max_output_tokens' } : null,
    instructions: body.instructions ?? null,
    max_output_tokens: body.max_output_tokens ?? null,
    model,
    output,
    parallel_tool_calls: true,
    temperature: 1,
    tool_choice: 'auto',
    tools: [],
    top_p: 1,
    usage
  })
  const finalStatus = reason === 'length' ? 'incomplete' : 'completed'
  const usage = {
    input_tokens: inputTokens,
    output_tokens: words.length,
    total_tokens: inputTokens + words.length,
    ...(cost ? { input_tokens_details: { cached_tokens: cachedTokens } } : {})
  }
  if (body.stream !== true) {
    await sleep(tokenDelayMs * words.length)
    return ex.send(200, { 'Content-Type': JSON_TYPE }, JSON.stringify(response(finalStatus, [item('completed', [part(text)])], usage)))
  }
  if (!ex.beginStream(SSE_TYPE)) return
  let seq = 0
  const emit = (type: string, data: Record<string, unknown>): string => event(type, { type, sequence_number: seq++, ...data })
  const at = { item_id: itemId, output_index: 0, content_index: 0 }
  if (!ex.line(emit('response.created', { response: response('in_progress', [], null) }) +
    emit('response.in_progress', { response: response('in_progress', [], null) }))) return
  if (!ex.line(emit('response.output_item.added', { output_index: 0, item: item('in_progress', []) }) +
    emit('response.content_part.added', { ...at, part: part('') }))) return
  for (const w of words) {
    await sleep(tokenDelayMs)
    if (!ex.line(emit('response.output_text.delta', { ...at, delta: w, logprobs: [] }))) return
  }
  if (!ex.line(emit('response.output_text.done', { ...at, text, logprobs: [] }) +
    emit('response.content_part.done', { ...at, part: part(text) }) +
    emit('response.output_item.done', { output_index: 0, item: item('completed', [part(text)]) }))) return
  ex.endStream(emit(finalStatus === 'completed' ? 'response.completed' : 'response.incomplete', { response: response(finalStatus, [item('completed', [part(text)])], usage) }))
}
