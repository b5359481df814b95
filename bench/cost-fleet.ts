/**
 * Scheduler v3's scenarios (g), (h), (i): a fleet of Ollama simulators with the cost model
 * (prefill per uncached token, a prompt cache per server, loads with eviction, an internal FIFO),
 * in a child process of its own (bench/cost-simulators.ts), started fresh for every contender so
 * that each one begins with cold caches and no model resident.
 */
import { fork, type ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { CostOptions } from '../scripts/simulator/ollama-costs.js'
import { killOnExit } from './processes.js'

export interface CostFleetOptions {
  servers: number
  /** what each server lists (and so accepts) */
  models: string[]
  cost: CostOptions
  /** answer tokens per request (the cost model's default answer length) */
  tokens: number
}

/** One request as the simulator counted it, with the tag its prompt carried (see tagOf). */
export interface TaggedRecord {
  server: number
  tag: string | undefined
  model: string
  promptTokens: number
  computedTokens: number
  cachedTokens: number
  evalCount: number
  loadMs: number
  /** the simulator's own time to first token, ms */
  ttftMs: number
}

export interface CostReport {
  computedPromptTokens: number
  cachedPromptTokens: number
  loads: number
  records: TaggedRecord[]
}

export type CostFleetCommand = { type: 'mark' } | { type: 'report' } | { type: 'close' }
export type CostFleetReply =
  | { type: 'ready', ports: number[] }
  | { type: 'mark' }
  /** since the last mark (or the start) */
  | { type: 'report', report: CostReport }

/**
 * The tag a request's prompt carries: the first word of its first user message when that word
 * starts with `tag:` (the bench's clients put one there to tell sessions and keys apart, as the
 * simulator's records carry no prompt text).
 */
export const TAG_PREFIX = 'tag:'
export function tagOf (body: unknown): string | undefined {
  const messages = (body as { messages?: unknown } | undefined)?.messages
  if (!Array.isArray(messages)) return undefined
  const first = messages.find((m) => (m as { role?: unknown })?.role === 'user') as { content?: unknown } | undefined
  if (typeof first?.content !== 'string' || !first.content.startsWith(TAG_PREFIX)) return undefined
  const end = first.content.indexOf(' ')
  return first.content.slice(TAG_PREFIX.length, end < 0 ? undefined : end)
}

const here = fileURLToPath(new URL('.', import.meta.url))

export class CostFleet {
  private readonly replies: Array<(reply: CostFleetReply) => void> = []
  private constructor (private readonly child: ChildProcess, readonly ports: number[]) {
    child.on('message', (reply: CostFleetReply) => this.replies.shift()?.(reply))
  }

  static async start (opts: CostFleetOptions): Promise<CostFleet> {
    const child = fork(join(here, 'cost-simulators.js'), [JSON.stringify(opts)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    killOnExit(child)
    const ports = await new Promise<number[]>((resolve, reject) => {
      child.once('message', (reply: CostFleetReply) => { if (reply.type === 'ready') resolve(reply.ports) })
      child.once('exit', (code) => reject(new Error(`cost simulator process exited (${code})`)))
    })
    return new CostFleet(child, ports)
  }

  private async ask (command: CostFleetCommand): Promise<CostFleetReply> {
    return await new Promise((resolve) => {
      this.replies.push(resolve)
      this.child.send(command)
    })
  }

  /** Counts from here on only. */
  async mark (): Promise<void> {
    await this.ask({ type: 'mark' })
  }

  async report (): Promise<CostReport> {
    const reply = await this.ask({ type: 'report' })
    if (reply.type !== 'report') throw new Error(`cost simulator answered ${reply.type} to report`)
    return reply.report
  }

  async close (): Promise<void> {
    if (this.child.exitCode != null) return
    const exited = new Promise((resolve) => this.child.once('exit', resolve))
    this.child.send({ type: 'close' } satisfies CostFleetCommand)
    await exited
  }
}
