/**
 * Usage captured from the answers (CONTRACT 17): what one admitted request used, read from the
 * answer the gateway passes on, and recorded once in the usage ledger when the exchange has ended
 * and its lease is released (GPU-seconds run from grant to release, which may follow a client
 * that left by a grace period).
 *
 * Cheap on the hot path: a streamed answer is cut into lines and a line is read only when it
 * carries the family's usage marker (Ollama's final line, an SSE event with `"usage"`); token
 * lines are only counted, never parsed. A JSON answer keeps its last USAGE_TAIL bytes, where every
 * family puts its counts (after the content), and reads them at its end. Counts are read as the
 * numbers after a key (`"eval_count":12`): a JSON string cannot hold an unescaped quote, so no
 * model output can pose as one.
 */
import type { UsageCounts, UsageEntry } from './usage-ledger.js'

/** How an answer states its counts. */
export type AnswerFamily = 'ollama' | 'openai' | 'anthropic' | 'responses' | 'image' | 'speech'

/** The family of the answer to an upstream path (the route's own path, never the client's). */
export function familyOf (path: string): AnswerFamily {
  if (path.startsWith('/api/')) return 'ollama'
  if (path === '/v1/messages') return 'anthropic'
  if (path === '/v1/responses') return 'responses'
  if (path.startsWith('/v1/audio/')) return 'speech'
  if (path === '/txt2img' || path === '/img2img') return 'image'
  return 'openai'
}

interface FamilyKeys {
  prompt: string
  cached: string
  output: string
  /** a line is read only when it holds this */
  marker: string
  /** a line holding this is a streamed token (counted when the stream breaks off before its counts) */
  token: string
  /** a line holding this carries the stream's final counts */
  final: string
}

type TextFamily = 'ollama' | 'openai' | 'anthropic' | 'responses'

const KEYS: Record<TextFamily, FamilyKeys> = {
  ollama: { prompt: 'prompt_eval_count', cached: 'prompt_eval_cached_count', output: 'eval_count', marker: '_count"', token: '"done":false', final: '"done":true' },
  openai: { prompt: 'prompt_tokens', cached: 'cached_tokens', output: 'completion_tokens', marker: '"usage"', token: '"choices":[{', final: '"completion_tokens"' },
  // Ollama's Anthropic API gives the whole prompt as input_tokens, its cached part as cache_read_input_tokens
  anthropic: { prompt: 'input_tokens', cached: 'cache_read_input_tokens', output: 'output_tokens', marker: '"usage"', token: '"content_block_delta"', final: '"message_delta"' },
  responses: { prompt: 'input_tokens', cached: 'cached_tokens', output: 'output_tokens', marker: '"usage"', token: '"response.output_text.delta"', final: '"output_tokens"' }
}

/** A family's keys and markers as bytes, made once: counts are read from the answer's bytes, never decoded to text. */
interface FamilyNeedles {
  marker: Buffer
  token: Buffer
  final: Buffer
  prompt: Buffer
  cached: Buffer
  output: Buffer
}

/** `"key"` as bytes */
const quoted = (key: string): Buffer => Buffer.from(`"${key}"`)

const NEEDLES = Object.fromEntries(Object.entries(KEYS).map(([family, k]) => [family, {
  marker: Buffer.from(k.marker),
  token: Buffer.from(k.token),
  final: Buffer.from(k.final),
  prompt: quoted(k.prompt),
  cached: quoted(k.cached),
  output: quoted(k.output)
}])) as Record<TextFamily, FamilyNeedles>

/** Ollama's final line: the prefill's and the load's durations (ns). */
const PROMPT_EVAL_DURATION = quoted('prompt_eval_duration')
const LOAD_DURATION = quoted('load_duration')

/** Bytes of a JSON answer kept for its counts: they follow the content, in a few hundred bytes. */
export const USAGE_TAIL = 16 * 1024
/** A line longer than this (a huge final event) is read from its last USAGE_TAIL bytes only. */
const LINE_MAX = 1024 * 1024

const isSpace = (c: string | undefined): boolean => c === ' ' || c === '\t' || c === '\n' || c === '\r'

const isSpaceByte = (c: number): boolean => c === 32 || c === 9 || c === 10 || c === 13

/** The whole number after the last `"key":` in `bytes` (`needle` is `"key"`), if there is one. */
export function lastCount (bytes: Buffer, needle: Buffer): number | undefined {
  let at = bytes.lastIndexOf(needle)
  while (at >= 0) {
    let i = at + needle.length
    while (i < bytes.length && isSpaceByte(bytes[i])) i++
    if (bytes[i] === 58) { // ':'
      i++
      while (i < bytes.length && isSpaceByte(bytes[i])) i++
      let j = i
      let n = 0
      while (j < bytes.length && j - i < 16 && bytes[j] >= 48 && bytes[j] <= 57) n = n * 10 + (bytes[j++] - 48)
      if (j > i) return n
    }
    if (at === 0) break
    at = bytes.lastIndexOf(needle, at - 1)
  }
  return undefined
}

/** The first number after `"key":` (a fraction allowed), for speech's seconds. */
function lastSeconds (text: string, key: string): number | undefined {
  const needle = `"${key}"`
  const at = text.lastIndexOf(needle)
  if (at < 0) return undefined
  let i = at + needle.length
  while (isSpace(text[i])) i++
  if (text[i] !== ':') return undefined
  i++
  while (isSpace(text[i])) i++
  let j = i
  while (j < text.length && j - i < 24 && '0123456789.eE+-'.includes(text[j])) j++
  const n = Number(text.slice(i, j))
  return j > i && Number.isFinite(n) ? n : undefined
}

const NEWLINE = 10

/**
 * Watches one answer's bytes as they are passed on and says what it used. Feed it every chunk
 * (`chunk`), then read `counts(complete)`: complete is whether the upstream's answer ended whole.
 */
export class AnswerMeter {
  private readonly needles?: FamilyNeedles
  private readonly lines: boolean
  private partial: Buffer[] = []
  private partialLength = 0
  /** JSON answers: the last bytes */
  private tail: Buffer[] = []
  private tailLength = 0
  /** Bytes seen so far, and how many of them the last read of the tail covered (counts and timings both ask). */
  private seen = 0
  private tailReadAt = -1
  private prompt?: number
  private cached?: number
  private output?: number
  private finalSeen = false
  private tokenLines = 0
  private seconds?: number
  /** Ollama's final line: prefill and load durations (ns), what the scheduler learns its rates from. */
  private promptEvalNs?: number
  private loadNs?: number

  constructor (readonly family: AnswerFamily, contentType: string) {
    this.needles = family === 'image' || family === 'speech' ? undefined : NEEDLES[family]
    const type = contentType.toLowerCase()
    this.lines = this.needles !== undefined && (type.includes('text/event-stream') || type.includes('application/x-ndjson'))
  }

  chunk (data: Buffer): void {
    if (this.lines) return this.lineChunk(data)
    if (this.family === 'image') return
    this.seen += data.length
    this.tail.push(data)
    this.tailLength += data.length
    while (this.tail.length > 1 && this.tailLength - this.tail[0].length >= USAGE_TAIL) this.tailLength -= (this.tail.shift() as Buffer).length
  }

  private lineChunk (data: Buffer): void {
    let start = 0
    let nl = data.indexOf(NEWLINE)
    while (nl >= 0) {
      if (this.partialLength > 0) {
        this.partial.push(data.subarray(start, nl))
        this.line(Buffer.concat(this.partial))
        this.partial = []
        this.partialLength = 0
      } else {
        this.line(data.subarray(start, nl))
      }
      start = nl + 1
      nl = data.indexOf(NEWLINE, start)
    }
    if (start < data.length) {
      this.partial.push(data.subarray(start))
      this.partialLength += data.length - start
      // an endless line: keep its end only
      while (this.partialLength > LINE_MAX && this.partial.length > 1) this.partialLength -= (this.partial.shift() as Buffer).length
    }
  }

  private line (line: Buffer): void {
    const needles = this.needles as FamilyNeedles
    if (line.length === 0) return
    if (line.indexOf(needles.marker) < 0) {
      if (line.indexOf(needles.token) >= 0) this.tokenLines++
      return
    }
    this.read(line.length > LINE_MAX ? line.subarray(line.length - USAGE_TAIL) : line, needles)
  }

  /** A JSON answer's counts, from its last bytes: read again only when bytes came since. */
  private readTail (needles: FamilyNeedles): void {
    if (this.tailReadAt === this.seen || this.tailLength === 0) return
    this.tailReadAt = this.seen
    this.read(this.tail.length === 1 ? this.tail[0] : Buffer.concat(this.tail), needles)
  }

  private read (bytes: Buffer, needles: FamilyNeedles): void {
    const prompt = lastCount(bytes, needles.prompt)
    const cached = lastCount(bytes, needles.cached)
    const output = lastCount(bytes, needles.output)
    if (prompt !== undefined) this.prompt = prompt
    if (cached !== undefined) this.cached = cached
    if (output !== undefined) this.output = output
    if (this.family === 'ollama') {
      this.promptEvalNs = lastCount(bytes, PROMPT_EVAL_DURATION) ?? this.promptEvalNs
      this.loadNs = lastCount(bytes, LOAD_DURATION) ?? this.loadNs
    }
    if ((output !== undefined || prompt !== undefined) && bytes.includes(needles.final)) this.finalSeen = true
  }

  /** The server's own timings, ms (Ollama's final line only): prefill of the computed prompt tokens, and the model's load. */
  timings (): { promptEvalMs?: number, loadMs?: number } {
    if (this.needles !== undefined && !this.lines) this.readTail(this.needles)
    return {
      promptEvalMs: this.promptEvalNs !== undefined ? this.promptEvalNs / 1e6 : undefined,
      loadMs: this.loadNs !== undefined ? this.loadNs / 1e6 : undefined
    }
  }

  /**
   * What the answer used. A stream broken off before its final counts counts what was served:
   * the last counts seen, its streamed token records as output when there were more of them.
   */
  counts (complete: boolean, statusCode: number): Partial<UsageCounts> {
    if (statusCode < 200 || statusCode >= 300) return {}
    if (this.family === 'image') return complete ? { images: 1 } : {}
    if (this.family === 'speech') {
      const text = this.tailLength > 0 ? Buffer.concat(this.tail).toString() : ''
      // a transcription that says how long its audio was (verbose_json's duration, or usage.seconds)
      this.seconds = lastSeconds(text, 'seconds') ?? lastSeconds(text, 'duration')
      return this.seconds !== undefined ? { audioSeconds: this.seconds } : {}
    }
    if (!this.lines) this.readTail(this.needles as FamilyNeedles)
    let output = this.output ?? 0
    // broken off before its counts: what was served. A whole answer that states none: none.
    if (this.lines && !this.finalSeen && !complete) output = Math.max(output, this.tokenLines)
    return { promptTokens: this.prompt ?? 0, cachedPromptTokens: this.cached ?? 0, outputTokens: output }
  }
}

/** What the record of one request needs from its exchange when it is written. */
export interface RequestUsageEnd {
  /** the assignment that served it ('' when none did) */
  assignment: string
  gpuSeconds: number
  /** a gateway- or upstream-made 4xx/5xx */
  failed: boolean
}

/**
 * One admitted request's usage: counts added while it runs, recorded once when both its exchange
 * has ended (`closed`) and no lease of it is still held (`released`).
 */
export class RequestUsage {
  private readonly counts: Partial<UsageCounts> = {}
  private meter?: AnswerMeter
  private complete = false
  private statusCode = 0
  private closed = false
  private recorded = false
  private brokenOff = false

  constructor (
    private readonly entry: Pick<UsageEntry, 'client' | 'model' | 'budgetKey'>,
    private readonly end: () => RequestUsageEnd & { holding: boolean },
    private readonly record: (entry: UsageEntry) => void
  ) {}

  /** Counts the route knows itself (the images of a generation it made). */
  add (counts: Partial<UsageCounts>): void {
    for (const k in counts) {
      const v = counts[k as keyof UsageCounts]
      if (v !== undefined) this.counts[k as keyof UsageCounts] = (this.counts[k as keyof UsageCounts] ?? 0) + v
    }
  }

  /** The answer passed on: its chunks go to `meter.chunk`; `ended` when the upstream's answer ended whole. */
  answer (path: string, contentType: string, statusCode: number): AnswerMeter {
    this.meter = new AnswerMeter(familyOf(path), contentType)
    this.statusCode = statusCode
    this.complete = false
    return this.meter
  }

  /** The upstream's answer ended whole. */
  ended (): void {
    this.complete = true
  }

  /** The upstream broke off mid-answer while the client was there: an error too. */
  upstreamBrokeOff (): void {
    this.brokenOff = true
  }

  /** What the answer used so far, as it will be recorded (the request's trace reads it when the exchange ends). */
  used (): Partial<UsageCounts> {
    return this.meter !== undefined ? this.meter.counts(this.complete, this.statusCode) : {}
  }

  /** The exchange has ended. */
  close (): void {
    this.closed = true
    this.maybeRecord()
  }

  /** A lease of the request was released. */
  released (): void {
    this.maybeRecord()
  }

  private maybeRecord (): void {
    if (this.recorded || !this.closed) return
    const end = this.end()
    if (end.holding) return
    this.recorded = true
    if (this.meter !== undefined) this.add(this.meter.counts(this.complete, this.statusCode))
    const c = this.counts
    // one shape for every entry (spreads of optional fields made each request's object a new shape)
    this.record({
      client: this.entry.client,
      model: this.entry.model,
      budgetKey: this.entry.budgetKey,
      assignment: end.assignment,
      requests: 1,
      promptTokens: c.promptTokens,
      cachedPromptTokens: c.cachedPromptTokens,
      outputTokens: c.outputTokens,
      images: c.images,
      audioSeconds: c.audioSeconds,
      gpuSeconds: end.gpuSeconds,
      errors: end.failed || this.brokenOff ? 1 : 0
    })
  }
}
