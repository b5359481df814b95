/**
 * What the simulated Ollama's routes work with: the server's state, the kit a route's handler gets
 * (`OllamaRouteKit`, `OllamaRoute`), and Ollama's wire format: model names, gin's JSON binding into
 * Go structs, Go durations, its JSON / NDJSON / SSE answers and errors. The route modules
 * (ollama.ts, ollama-extras.ts) import from here, never from each other's caller.
 */
import { createHash } from 'node:crypto'
import type { Ctx } from './http.js'
import type { CostModel, ModelRunners, Turn } from './ollama-costs.js'
import { type Exchange, SSE_TYPE, openAiError, sleep, tokensFor, promptTokens, embedVector } from './behaviour.js'

export { SSE_TYPE }
export const JSON_TYPE = 'application/json; charset=utf-8'
export const NDJSON_TYPE = 'application/x-ndjson'
export const MODIFIED_AT = '2025-01-01T00:00:00.000000000Z'

/** Ollama's model-name matching: case-insensitive, default host/namespace and tag `latest` implied. */
export function modelKey (name: string): string {
  let n = name.toLowerCase()
  if (n.startsWith('registry.ollama.ai/')) n = n.slice('registry.ollama.ai/'.length)
  if (n.startsWith('library/')) n = n.slice('library/'.length)
  if (n.endsWith(':latest')) n = n.slice(0, -':latest'.length)
  return n
}

export function displayName (name: string): string {
  const last = name.slice(name.lastIndexOf('/') + 1)
  return last.includes(':') ? name : `${name}:latest`
}

export function digestOf (s: string): string {
  return createHash('sha256').update(s).digest('hex')
}

/**
 * A model's family as Ollama's details show it: the letters its last path segment begins with
 * (`library/llama3.2:latest` → `llama`), `llama` when there are none.
 */
export function modelFamily (name: string): string {
  const key = modelKey(name)
  const segment = key.slice(key.lastIndexOf('/') + 1)
  let end = 0
  while (end < segment.length && segment[end] >= 'a' && segment[end] <= 'z') end++
  return segment.slice(0, end) || 'llama'
}

export function modelDetails (name: string): Record<string, unknown> {
  const family = modelFamily(name)
  return { parent_model: '', format: 'gguf', family, families: [family], parameter_size: '3.2B', quantization_level: 'Q4_K_M' }
}

export function modelSize (name: string): number {
  return 1_000_000_000 + (parseInt(digestOf(name).slice(0, 6), 16) % 1_000_000_000)
}

/** Go's encoding/json type word for a JSON value. */
function goKind (v: unknown): string {
  if (Array.isArray(v)) return 'array'
  if (v === null) return 'null'
  switch (typeof v) {
    case 'number': return 'number'
    case 'string': return 'string'
    case 'boolean': return 'bool'
    default: return 'object'
  }
}

/** Something like the message Go's JSON decoder gives for text that does not parse. */
function goJsonError (text: string): string {
  try {
    JSON.parse(text)
    return 'invalid JSON'
  } catch (err) {
    const msg = (err as Error).message
    if (/end of JSON input/i.test(msg)) return 'unexpected EOF'
    const pos = /position (\d+)/.exec(msg)
    const p = pos !== null ? Number(pos[1]) : -1
    if (/non-whitespace character after JSON/i.test(msg) && p >= 0) return `invalid character '${text[p]}' after top-level value`
    if (/Expected property name/i.test(msg) && p >= 0) return `invalid character '${text[p]}' looking for beginning of object key string`
    let ch = p >= 0 ? text[p] : undefined
    if (ch === undefined) ch = /Unexpected token '?(.)'?/.exec(msg)?.[1]
    if (ch === undefined) ch = text.trim()[0] ?? ' '
    return `invalid character '${ch}' looking for beginning of value`
  }
}

/** Go's time.ParseDuration: the duration in ms, or an error message. */
function goDuration (s: string): { ms: number } | { error: string } {
  const quoted = JSON.stringify(s)
  let rest = s
  let sign = 1
  if (rest.startsWith('-') || rest.startsWith('+')) {
    if (rest[0] === '-') sign = -1
    rest = rest.slice(1)
  }
  if (rest === '0') return { ms: 0 }
  if (rest === '') return { error: `time: invalid duration ${quoted}` }
  const units: Record<string, number> = { ns: 1e-6, us: 1e-3, 'µs': 1e-3, 'μs': 1e-3, ms: 1, s: 1000, m: 60_000, h: 3_600_000 }
  let total = 0
  while (rest !== '') {
    const num = /^(\d*)(?:\.(\d*))?/.exec(rest)
    if (num === null || num[0] === '' || num[0] === '.' || (num[1] === '' && (num[2] ?? '') === '')) return { error: `time: invalid duration ${quoted}` }
    rest = rest.slice(num[0].length)
    const unit = /^[^0-9.]*/.exec(rest)?.[0] ?? ''
    if (unit === '') return { error: `time: missing unit in duration ${quoted}` }
    const factor = units[unit]
    if (factor === undefined) return { error: `time: unknown unit ${JSON.stringify(unit)} in duration ${quoted}` }
    total += Number(num[0]) * factor
    rest = rest.slice(unit.length)
  }
  return { ms: sign * total }
}

export type FieldSpec = Record<string, ['string' | 'bool' | 'array' | 'object' | 'number' | 'duration' | 'any', string]>

const COMMON_FIELDS: FieldSpec = {
  model: ['string', 'string'],
  keep_alive: ['duration', '*api.Duration'],
  stream: ['bool', '*bool'],
  options: ['object', 'map[string]interface {}']
}

/** Mimics gin's ShouldBindJSON into an Ollama request struct: the body, or an error message. */
export function bindGo (text: string, struct: string, fields: FieldSpec): { body: Record<string, any> } | { error: string, eof?: boolean } {
  if (text.trim() === '') return { error: 'EOF', eof: true }
  let v: unknown
  try {
    v = JSON.parse(text)
  } catch {
    return { error: goJsonError(text) }
  }
  if (v === null) v = {}
  if (typeof v !== 'object' || Array.isArray(v)) return { error: `json: cannot unmarshal ${goKind(v)} into Go value of type ${struct}` }
  const body = v as Record<string, any>
  const shortStruct = struct.replace(/^.*\./, '')
  for (const [field, [kind, goType]] of Object.entries({ ...COMMON_FIELDS, ...fields })) {
    const value = body[field]
    if (value === undefined || value === null || kind === 'any') continue
    if (kind === 'duration') {
      if (typeof value === 'number') continue
      if (typeof value === 'string') {
        const d = goDuration(value)
        if ('error' in d) return { error: d.error }
        continue
      }
      return { error: `Unsupported type: '${Array.isArray(value) ? '[]interface {}' : typeof value === 'boolean' ? 'bool' : 'map[string]interface {}'}'` }
    }
    if (goKind(value) !== kind) return { error: `json: cannot unmarshal ${goKind(value)} into Go struct field ${shortStruct}.${field} of type ${goType}` }
  }
  return { body }
}

/** keep_alive in ms; undefined when absent (server default). Negative = forever. */
export function keepAliveMs (v: unknown): number | undefined {
  if (typeof v === 'number') return v * 1000
  if (typeof v === 'string') {
    const d = goDuration(v)
    return 'ms' in d ? d.ms : undefined
  }
  return undefined
}

/** The token ids of a generate's prompt template and answer: hundreds of ints, as a real `context` is. */
export function contextTokens (prompt: string, answered: number): number[] {
  const n = 256 + promptTokens(prompt) + answered
  const h = createHash('sha256').update(prompt).digest()
  return Array.from({ length: n }, (_, i) => 128000 + ((h[i % h.length] * 257 + i * 7919) % 100000))
}

export interface OllamaState {
  models: string[]
  tokens: number
  tokenDelayMs: number
  embedDims: number
  version: string
  hostCheck: boolean
  numParallel: number
  keepAliveMs: number
  /** the resident models, loads and slots */
  runners: ModelRunners
  /** the opt-in cost model (SimulatorOptions.cost); null: fixed delays, no cache */
  cost: CostModel | null
}

/**
 * A text answer (see OllamaRouteKit.answer): its tokens, the delay before each, and the counts for
 * the final line / usage. With the cost model the prefill has been waited for already.
 */
export interface Answer {
  words: string[]
  reason: 'stop' | 'length'
  /** delay before each token */
  tokenDelayMs: number
  /** the whole prompt */
  promptTokens: number
  /** of which from the cache */
  cachedTokens: number
  /** the cost model answered (its counts are Ollama's; without it, historical estimates) */
  cost: boolean
  /** the native final line's counts and durations (ns) */
  durations: () => Record<string, number>
  /** OpenAI `usage` (with `prompt_tokens_details.cached_tokens` under the cost model) */
  openAiUsage: () => Record<string, unknown>
  /** Anthropic `usage` (with `cache_read_input_tokens` under the cost model) */
  anthropicUsage: (outputTokens: number) => Record<string, unknown>
}

/** What a route's handler gets: the request, its exchange, and the server's model runners. */
export interface OllamaRouteKit {
  st: OllamaState
  ctx: Ctx
  ex: Exchange
  /** the model is one this server has (case-insensitive, `:latest` implied) */
  known: (model: string) => boolean
  /**
   * Waits for a slot on the model's runner, loading the model first when it is not resident (load
   * time, eviction); the slot and the keep-alive are handled when the exchange's work is over.
   * False when the client left meanwhile.
   */
  run: (model: string, body: Record<string, any>) => Promise<boolean>
  /** keep_alive 0: drop the model now, or when its running requests end */
  unload: (model: string) => void
  /**
   * After run(): the answer to a prompt. `turns` renders the prompt for the cost model;
   * `promptCount` is the prompt's size without it (the simulator's historical estimate).
   */
  answer: (model: string, turns: () => Turn[], promptCount: number, limit: number | undefined) => Promise<Answer>
  /** the wire helpers of the built-in routes, for routes defined in other modules */
  wire: typeof WIRE
}

/**
 * One route of the Ollama simulator. Modules with more routes (ollama-extras.ts) export a list of
 * these, importing from this file only, and ollama.ts adds them to EXTRA_OLLAMA_ROUTES.
 */
export interface OllamaRoute {
  /** one method or several (Ollama answers HEAD on some GET routes only) */
  method: string | string[]
  path: string | RegExp
  /** model work: recorded on the GPU recorder and subject to the simulator's `behaviour` */
  work: boolean
  handle: (kit: OllamaRouteKit) => Promise<void> | void
}

/** An answer outside the exchange's behaviour (info routes). */
export function infoJson (ex: Exchange, status: number, obj: unknown): void {
  ex.plain(status, { 'Content-Type': JSON_TYPE }, JSON.stringify(obj))
}

export type Handler = (kit: OllamaRouteKit) => Promise<void>

export function errorJson (ex: Exchange, status: number, message: string): void {
  ex.plain(status, { 'Content-Type': JSON_TYPE }, JSON.stringify({ error: message }))
}

export function okJson (ex: Exchange, obj: unknown): void {
  ex.send(200, { 'Content-Type': JSON_TYPE }, JSON.stringify(obj))
}

export function bindNative (ex: Exchange, text: string, struct: string, fields: FieldSpec): Record<string, any> | undefined {
  const bound = bindGo(text, struct, fields)
  if ('error' in bound) {
    errorJson(ex, 400, bound.eof === true ? 'missing request body' : bound.error)
    return undefined
  }
  return bound.body
}

export function durations (st: OllamaState, evalCount: number, promptCount: number): Record<string, number> {
  const evalNs = Math.round(evalCount * st.tokenDelayMs * 1e6)
  return {
    total_duration: evalNs + 2_000_000,
    load_duration: 1_000_000,
    prompt_eval_count: promptCount,
    prompt_eval_duration: 1_000_000,
    eval_count: evalCount,
    eval_duration: evalNs
  }
}

export const numPredict = (body: Record<string, any>): number | undefined =>
  typeof body.options?.num_predict === 'number' ? body.options.num_predict : undefined

export function v1Error (ex: Exchange, status: number, message: string): void {
  ex.plain(status, { 'Content-Type': JSON_TYPE }, JSON.stringify(openAiError(status, message)))
}

export function bindOpenAi (ex: Exchange, text: string, struct: string, fields: FieldSpec): Record<string, any> | undefined {
  const bound = bindGo(text, struct, { ...fields, keep_alive: ['any', 'any'], options: ['any', 'any'] })
  if ('error' in bound) {
    v1Error(ex, 400, bound.error)
    return undefined
  }
  return bound.body
}

export function sse (obj: unknown): string {
  return `data: ${JSON.stringify(obj)}\n\n`
}

export const created = (): number => Math.floor(Date.now() / 1000)

export const WIRE = {
  JSON_TYPE,
  NDJSON_TYPE,
  SSE_TYPE,
  sleep,
  errorJson,
  okJson,
  infoJson,
  v1Error,
  openAiError,
  sse,
  bindNative,
  bindOpenAi,
  tokensFor,
  promptTokens,
  durations,
  keepAliveMs,
  created,
  embedVector,
  displayName,
  modelKey,
  modelDetails,
  modelSize,
  digestOf
}
