/**
 * What a request costs on the simulated Ollama, without HTTP: the model runners (loads, eviction
 * of the least recently used idle model, keep-alive, OLLAMA_NUM_PARALLEL slots with a FIFO of the
 * requests waiting for one), and the opt-in cost model (SimulatorOptions.cost): a deterministic
 * tokenisation of the rendered prompt, a prompt cache per model (slot states + an LRU RAM cache,
 * longest cached prefix reused), prefill time per computed token, decode time per answer token, and
 * the counters tests and the bench read (Simulator.costs()).
 *
 * Counts follow Ollama after PR 17943: `prompt_eval_count` is the whole prompt,
 * `prompt_eval_cached_count` the part that came from the cache, `prompt_eval_duration` covers the
 * computed tokens only.
 */
import { createHash } from 'node:crypto'
import { performance } from 'node:perf_hooks'
import { sleep, WORDS } from './behaviour.js'

/** A model load (or unload) on an Ollama simulator. */
export interface ResidencyEvent {
  model: string
  /** performance.now() when the load finished / the model was dropped */
  at: number
}

// ---------------------------------------------------------------------------------------------
// model runners: loads, eviction, keep-alive, slots

export interface Runner {
  name: string
  /** Date.now() ms after which an idle model is unloaded; Infinity = never */
  expiresAt: number
  contextLength: number
  /** requests running on it now (at most numParallel) */
  busy: number
  lastUsed: number
}

export interface RunnerOptions {
  /** OLLAMA_NUM_PARALLEL: requests one loaded model runs at once */
  numParallel: number
  /** time a model that is not resident takes to load */
  loadMs: number
  /** OLLAMA_MAX_LOADED_MODELS */
  maxLoadedModels: number
}

/** The models a server holds, by key (the caller's normalised name). */
export class ModelRunners {
  readonly resident = new Map<string, Runner>()
  readonly loads: ResidencyEvent[] = []
  readonly unloads: ResidencyEvent[] = []
  /** called when a model leaves (its prompt cache goes with it) */
  onDrop: (key: string) => void = () => {}
  private readonly loading = new Map<string, Promise<void>>()
  /** woken whenever a runner frees a slot or a model leaves */
  private waiters: Array<() => void> = []
  /** per model, the requests waiting for a slot, in arrival order (Ollama queues inside) */
  private readonly queues = new Map<string, number[]>()
  /**
   * the requests waiting for room to load their model (ticket → model). Ollama's scheduler takes
   * waiting requests in arrival order across models: a later request neither takes a slot ahead of
   * these nor evicts a model an earlier request still waits for (else two models evict each other
   * before either runs).
   */
  private readonly blocked = new Map<number, string>()
  private tickets = 0

  constructor (readonly opts: RunnerOptions) {}

  /** A model resident from the start (never expires until used). */
  seed (key: string, name: string): void {
    this.resident.set(key, { name, expiresAt: Infinity, contextLength: 4096, busy: 0, lastUsed: 0 })
  }

  running (): number {
    return [...this.resident.values()].reduce((n, r) => n + r.busy, 0)
  }

  /**
   * A slot on the model's runner, loading (and evicting the least recently used idle model) first
   * if needed; requests for one model get slots in arrival order. `loaded`: this request waited for
   * a load of its model.
   */
  async acquire (key: string, name: string, contextLength: number): Promise<{ runner: Runner, loaded: boolean }> {
    const ticket = ++this.tickets
    const queue = this.queues.get(key) ?? []
    this.queues.set(key, queue)
    queue.push(ticket)
    let loaded = false
    for (;;) {
      this.expire()
      const r = this.resident.get(key)
      if (r !== undefined) {
        if (r.busy < this.opts.numParallel && queue[0] === ticket && !this.blockedBefore(ticket, key)) {
          this.blocked.delete(ticket)
          queue.shift()
          if (queue.length === 0) this.queues.delete(key)
          else this.wake() // the next in line may fit too
          r.busy++
          r.lastUsed = performance.now()
          return { runner: r, loaded }
        }
      } else {
        const loading = this.loading.get(key)
        if (loading !== undefined) {
          loaded = true
          await loading
          continue
        }
        if (this.resident.size + this.loading.size >= this.opts.maxLoadedModels) {
          const idle = [...this.resident].filter(([k, x]) => x.busy === 0 && !this.queuedBefore(k, ticket)).sort(([, a], [, b]) => a.lastUsed - b.lastUsed)[0]
          if (idle !== undefined) this.drop(idle[0])
        }
        if (this.resident.size + this.loading.size < this.opts.maxLoadedModels) {
          this.blocked.delete(ticket)
          const load = sleep(this.opts.loadMs).then(() => {
            this.loading.delete(key)
            this.resident.set(key, { name, expiresAt: Infinity, contextLength, busy: 0, lastUsed: performance.now() })
            this.loads.push({ model: name, at: performance.now() })
            this.wake()
          })
          this.loading.set(key, load)
          loaded = true
          await load
          continue
        }
        this.blocked.set(ticket, key)
      }
      await new Promise<void>(resolve => this.waiters.push(resolve))
    }
  }

  /** An earlier request waits for room to load another model. */
  private blockedBefore (ticket: number, key: string): boolean {
    for (const [t, k] of this.blocked) if (t < ticket && k !== key) return true
    return false
  }

  /** An earlier request than `ticket` waits for a slot on `key`'s model. */
  private queuedBefore (key: string, ticket: number): boolean {
    const q = this.queues.get(key)
    return q !== undefined && q.length > 0 && q[0] < ticket
  }

  /** A request's slot back; the model stays until `expiresAt` (Date.now() ms). */
  release (key: string, r: Runner, expiresAt: number): void {
    r.busy--
    r.lastUsed = performance.now()
    r.expiresAt = expiresAt
    if (r.expiresAt <= Date.now() && r.busy === 0) this.drop(key)
    this.wake()
  }

  /** keep_alive 0: drop the model now, or when its running requests end. */
  unload (key: string): void {
    const r = this.resident.get(key)
    if (r === undefined) return
    r.expiresAt = 0
    if (r.busy === 0) this.drop(key)
  }

  /** Unloads the idle models whose keep-alive has run out. */
  expire (): void {
    const now = Date.now()
    for (const [key, r] of this.resident) if (r.busy === 0 && r.expiresAt <= now) this.drop(key)
  }

  private drop (key: string): void {
    const r = this.resident.get(key)
    if (r === undefined) return
    this.resident.delete(key)
    this.unloads.push({ model: r.name, at: performance.now() })
    this.onDrop(key)
    this.wake()
  }

  private wake (): void {
    for (const w of this.waiters.splice(0)) w()
  }
}

// ---------------------------------------------------------------------------------------------
// tokens

const isSpace = (ch: string): boolean => ch === ' ' || ch === '\n' || ch === '\t' || ch === '\r'

/**
 * A deterministic stand-in for a tokenizer: the text cut into words (each with the whitespace
 * before it), each word into pieces of at most 4 characters. Cutting a text between two tokens and
 * tokenising both halves gives the same tokens, as the cache needs.
 */
export function tokenize (text: string): string[] {
  const tokens: string[] = []
  let word: string[] = []
  const flush = (): void => {
    for (let i = 0; i < word.length; i += 4) tokens.push(word.slice(i, i + 4).join(''))
    word = []
  }
  for (const ch of text) {
    if (isSpace(ch) && word.length > 0 && !isSpace(word[word.length - 1])) flush()
    word.push(ch)
  }
  flush()
  return tokens
}

/** One message of a conversation as a chat template sees it. */
export interface Turn {
  role: string
  content: unknown
}

/** A message's text: a string, or the `text` of its parts (OpenAI, Anthropic and Responses content arrays). */
function textOf (content: unknown): string {
  if (typeof content === 'string') return content
  if (Array.isArray(content)) {
    return content.map(p => p !== null && typeof p === 'object' && typeof (p as { text?: unknown }).text === 'string' ? (p as { text: string }).text : JSON.stringify(p)).join('')
  }
  return content === undefined || content === null ? '' : JSON.stringify(content)
}

/**
 * The prompt's tokens as a chat template renders them: per message a role marker, the content and
 * an end marker, then the assistant marker the answer follows. So the next turn of a conversation
 * (its messages, the answer, a new message) begins with exactly the tokens of this prompt + answer.
 */
export function renderPrompt (turns: Turn[]): string[] {
  const tokens: string[] = []
  for (const t of turns) tokens.push(`<|${t.role}|>`, ...tokenize(textOf(t.content)), '<|end|>')
  tokens.push('<|assistant|>')
  return tokens
}

/** Turns from chat messages (`/api/chat`, `/v1/chat/completions`, `/v1/messages`), after an optional system prompt. */
export function chatTurns (messages: unknown[], system?: unknown): Turn[] {
  const turns: Turn[] = []
  if (system !== undefined && system !== null && system !== '') turns.push({ role: 'system', content: system })
  for (const m of messages) {
    if (m !== null && typeof m === 'object') {
      const msg = m as { role?: unknown, content?: unknown }
      turns.push({ role: typeof msg.role === 'string' ? msg.role : 'user', content: msg.content })
    } else turns.push({ role: 'user', content: m })
  }
  return turns
}

/** Turns of an OpenAI Responses request: `instructions` as the system prompt, `input` a string or items. */
export function responsesTurns (input: unknown, instructions?: unknown): Turn[] {
  return chatTurns(typeof input === 'string' ? [{ role: 'user', content: input }] : Array.isArray(input) ? input : [input], instructions)
}

/** The answer to a prompt: `n` tokens, the same for the same prompt, different across conversations. */
export function answerTokens (prompt: string[], n: number): string[] {
  if (n <= 0) return []
  const seed = createHash('sha256').update(prompt.join('\u0000')).digest()
  const words: string[] = []
  let tokens: string[] = []
  for (let i = 0; tokens.length < n; i++) {
    words.push(WORDS[(seed[0] + i) % WORDS.length])
    tokens = tokenize(words.join(''))
  }
  return tokens.slice(0, n)
}

// ---------------------------------------------------------------------------------------------
// prompt cache

/** Length of the common prefix of two token lists. */
export function commonPrefix (a: string[], b: string[]): number {
  const n = Math.min(a.length, b.length)
  let i = 0
  while (i < n && a[i] === b[i]) i++
  return i
}

export interface CacheClaim {
  /** the slot the request runs in; give it back with release() */
  slot: number
  /** prompt tokens that come from the cache (at most all but the last) */
  cached: number
  /** where they came from: the slot's own state, a RAM entry reloaded into the slot, or none */
  source: 'slot' | 'ram' | 'none'
}

interface SlotState {
  tokens: string[]
  busy: boolean
  lastUsed: number
}

/**
 * One model's prompt cache on one server, as llama-server keeps it: `slots` slot states (each the
 * last prompt + answer run in it) and a host-RAM cache of up to `ramEntries` states that slots
 * gave up, least recently used evicted first.
 */
export class PromptCache {
  private readonly slots: SlotState[]
  /** least recently used first */
  private readonly ram: string[][] = []
  private clock = 0

  constructor (slots: number, private readonly ramEntries: number) {
    this.slots = Array.from({ length: Math.max(1, slots) }, () => ({ tokens: [], busy: false, lastUsed: 0 }))
  }

  /**
   * A free slot for `prompt`: the one whose state shares the longest prefix with it (ties: the least
   * recently used), or, when a RAM entry shares more, the least recently used free slot with that
   * entry reloaded into it. A slot state the prompt does not continue is kept in the RAM cache.
   * At least the prompt's last token is computed (the model needs its logits).
   */
  claim (prompt: string[]): CacheClaim {
    const free = this.slots.map((s, i) => ({ s, i })).filter(x => !x.s.busy)
    if (free.length === 0) throw new Error('no free slot: the runner admits at most `slots` requests')
    let best = free[0]
    let bestLen = -1
    for (const x of free) {
      const len = commonPrefix(prompt, x.s.tokens)
      if (len > bestLen || (len === bestLen && x.s.lastUsed < best.s.lastUsed)) { best = x; bestLen = len }
    }
    let ramIndex = -1
    let ramLen = bestLen
    this.ram.forEach((entry, i) => {
      const len = commonPrefix(prompt, entry)
      if (len > ramLen) { ramIndex = i; ramLen = len }
    })
    let source: CacheClaim['source'] = bestLen > 0 ? 'slot' : 'none'
    if (ramIndex >= 0) {
      best = free.reduce((a, b) => b.s.lastUsed < a.s.lastUsed ? b : a)
      const [entry] = this.ram.splice(ramIndex, 1)
      this.stash(best.s.tokens)
      best.s.tokens = entry
      bestLen = ramLen
      source = 'ram'
    } else if (bestLen < best.s.tokens.length) this.stash(best.s.tokens)
    best.s.busy = true
    best.s.lastUsed = ++this.clock
    return { slot: best.i, cached: Math.max(0, Math.min(bestLen, prompt.length - 1)), source }
  }

  /** The slot back, holding what was computed in it: the prompt and the answer. */
  release (slot: number, tokens: string[]): void {
    const s = this.slots[slot]
    s.tokens = tokens
    s.busy = false
    s.lastUsed = ++this.clock
  }

  /** Copies of the slot states and RAM entries (least recently used first), for tests. */
  snapshot (): { slots: string[][], ram: string[][] } {
    return { slots: this.slots.map(s => [...s.tokens]), ram: this.ram.map(e => [...e]) }
  }

  private stash (tokens: string[]): void {
    if (tokens.length === 0 || this.ramEntries <= 0) return
    // an entry the new one extends adds nothing
    for (let i = this.ram.length - 1; i >= 0; i--) if (commonPrefix(this.ram[i], tokens) === this.ram[i].length) this.ram.splice(i, 1)
    this.ram.push(tokens)
    while (this.ram.length > this.ramEntries) this.ram.shift()
  }
}

// ---------------------------------------------------------------------------------------------
// the cost model and its counters

/** SimulatorOptions.cost: model work costs time per token, with a prompt cache (opt-in). */
export interface CostOptions {
  /** time per prompt token not found in the cache, before the first token */
  prefillMsPerToken: number
  /** time per answer token */
  decodeMsPerToken: number
  /** OLLAMA_NUM_PARALLEL: slots per loaded model (default: SimulatorOptions.numParallel, else 1) */
  slots?: number
  /** slot states the host-RAM prompt cache keeps per model (default 4) */
  ramCacheEntries?: number
  /** load time of a model not resident (default: SimulatorOptions.loadMs, else 20) */
  loadMs?: number
  /** OLLAMA_MAX_LOADED_MODELS (default: SimulatorOptions.maxLoadedModels, else 3) */
  maxLoadedModels?: number
  /** answer tokens when the request sets no limit (default: SimulatorOptions.tokens, else 5) */
  answerTokens?: number
}

/** What one request cost, as the server reported it (durations in ms). */
export interface CostRecord {
  model: string
  /** the request path */
  route: string
  promptTokens: number
  cachedTokens: number
  computedTokens: number
  cacheSource: CacheClaim['source']
  /** the load this request waited for (0: the model was resident) */
  loadMs: number
  prefillMs: number
  evalCount: number
  /** performance.now() when the request arrived / got a slot */
  arrivedAt: number
  startedAt: number
  /** time to first token: waiting inside the server (measured) + load + prefill + the first token's decode */
  ttftMs: number
}

export interface CostStats {
  /** prompt tokens computed (prefilled) / taken from the cache, over all requests */
  computedPromptTokens: number
  cachedPromptTokens: number
  /** loads per model, by the name it was loaded under */
  loads: Record<string, number>
  /** every costed request, in the order they got their slot */
  requests: CostRecord[]
}

/** A server's prompt caches (one per resident model) and counters. */
export class CostModel {
  readonly records: CostRecord[] = []
  private readonly caches = new Map<string, PromptCache>()

  constructor (readonly opts: Required<Pick<CostOptions, 'prefillMsPerToken' | 'decodeMsPerToken' | 'slots' | 'ramCacheEntries' | 'answerTokens'>>) {}

  cacheFor (key: string): PromptCache {
    let cache = this.caches.get(key)
    if (cache === undefined) {
      cache = new PromptCache(this.opts.slots, this.opts.ramCacheEntries)
      this.caches.set(key, cache)
    }
    return cache
  }

  /** The model left the server: its cache goes with it. */
  dropModel (key: string): void {
    this.caches.delete(key)
  }

  stats (loads: ResidencyEvent[]): CostStats {
    const byModel: Record<string, number> = {}
    for (const l of loads) byModel[l.model] = (byModel[l.model] ?? 0) + 1
    return {
      computedPromptTokens: this.records.reduce((n, r) => n + r.computedTokens, 0),
      cachedPromptTokens: this.records.reduce((n, r) => n + r.cachedTokens, 0),
      loads: byModel,
      requests: [...this.records]
    }
  }
}
