/**
 * `npm run bench -- --trace`: preloaded into the gateway (`--import`), it times the steps of the
 * hot path from inside, with Node's diagnostics channels (http, undici) and a wrapper around
 * ioredis's `sendCommand`; nothing of the gateway's own code is touched.
 *
 *   request    (one client: one request in flight at a time) arrival → attempt written → attempt
 *              answered → upstream request written → upstream headers → upstream's last byte →
 *              release written → response handed to the kernel
 *   handover   (one GPU, waiters) release written → release answered → the next upstream
 *              request written (the waiter it granted, on the GPU it freed)
 *
 * SIGWINCH (which the server leaves alone; close-with-grace takes SIGUSR2) starts a window (what came before is forgotten); the next SIGWINCH ends it and writes
 * the medians and 90th percentiles to MAESTRO_TRACE_FILE, as JSON.
 */
import dc from 'node:diagnostics_channel'
import { createHash } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import type { IncomingMessage } from 'node:http'
import { performance } from 'node:perf_hooks'
import { Redis } from 'ioredis'
import { loadLuaScripts } from '../services/lua/lua-scripts.js'

export const REQUEST_STEPS = ['attemptWritten', 'attemptAnswered', 'upstreamWritten', 'upstreamHeaders', 'upstreamEnded', 'releaseWritten', 'responseFinished'] as const
export const HANDOVER_STEPS = ['releaseAnswered', 'nextUpstreamWritten'] as const

type RequestStep = typeof REQUEST_STEPS[number]
type Times = Partial<Record<RequestStep | 'arrived', number>>

/** What the preload writes: per step, from the one before it, ms. */
export interface TraceSummary {
  requests: number
  handovers: number
  request: Record<string, { p50: number, p90: number }>
  handover: Record<string, { p50: number, p90: number }>
}

const file = process.env.MAESTRO_TRACE_FILE
if (file != null) {
  const sha = (lua: string): string => createHash('sha1').update(lua).digest('hex')
  const [attempt, release] = loadLuaScripts(['attempt-1', 'release-1']).map((s) => sha(s.lua))
  const now = (): number => performance.now()
  let on = false
  let current: Times | undefined
  let done: Times[] = []
  let handovers: Array<{ written: number, answered: number, next?: number }> = []
  let awaitingNext: Array<{ written: number, answered: number, next?: number }> = []

  dc.subscribe('http.server.request.start', (message) => {
    const request = (message as { request: IncomingMessage }).request
    if (!on || request.url == null || !request.url.startsWith('/api/')) return
    current = { arrived: now() }
    ;(request as IncomingMessage & { maestroTrace?: Times }).maestroTrace = current
  })
  dc.subscribe('http.server.response.finish', (message) => {
    const t = (message as { request: IncomingMessage & { maestroTrace?: Times } }).request.maestroTrace
    if (t == null) return
    t.responseFinished = now()
    done.push(t)
  })
  const mark = (step: RequestStep): void => {
    if (current != null && current[step] == null) current[step] = now()
  }
  dc.subscribe('undici:client:sendHeaders', () => {
    mark('upstreamWritten')
    const at = now()
    for (const h of awaitingNext) h.next = at
    awaitingNext = []
  })
  dc.subscribe('undici:request:headers', () => mark('upstreamHeaders'))
  dc.subscribe('undici:request:trailers', () => mark('upstreamEnded'))

  type Command = { name: string, args: unknown[], promise: Promise<unknown> }
  const proto = Redis.prototype as unknown as { sendCommand: (command: Command, stream?: unknown) => unknown }
  const send = proto.sendCommand
  proto.sendCommand = function (this: unknown, command: Command, stream?: unknown) {
    if (on && command.name === 'evalsha') {
      const which = command.args[0]
      const t = current
      const written = now()
      if (which === attempt && t != null && t.attemptWritten == null) {
        t.attemptWritten = written
        command.promise.then(() => { t.attemptAnswered ??= now() }, () => {})
      } else if (which === release) {
        if (t != null) t.releaseWritten ??= written
        command.promise.then((reply) => {
          // { epoch, run, flags, n, n values, grants... } (includes/prelude.lua): only a release
          // that granted a waiter hands over
          const r = reply as unknown[]
          if (r.length <= 4 + Number(r[3])) return
          const h = { written, answered: now() }
          handovers.push(h)
          awaitingNext.push(h)
        }, () => {})
      }
    }
    return send.call(this, command, stream)
  }

  const stats = (values: number[]): { p50: number, p90: number } => {
    values.sort((a, b) => a - b)
    const at = (q: number): number => +(values[Math.min(values.length - 1, Math.floor(values.length * q))] ?? NaN).toFixed(3)
    return { p50: at(0.5), p90: at(0.9) }
  }
  process.on('SIGWINCH', () => {
    if (!on) {
      on = true
      current = undefined
      done = []
      handovers = []
      awaitingNext = []
      return
    }
    on = false
    const complete = done.filter((t) => REQUEST_STEPS.every((s) => t[s] != null))
    const request: TraceSummary['request'] = {}
    let before: RequestStep | 'arrived' = 'arrived'
    for (const step of REQUEST_STEPS) {
      const from = before
      request[`${from} → ${step}`] = stats(complete.map((t) => (t[step] as number) - (t[from] as number)))
      before = step
    }
    request['arrived → responseFinished'] = stats(complete.map((t) => (t.responseFinished as number) - (t.arrived as number)))
    const next = handovers.filter((h) => h.next != null)
    const handover: TraceSummary['handover'] = {
      'releaseWritten → releaseAnswered': stats(next.map((h) => h.answered - h.written)),
      'releaseAnswered → nextUpstreamWritten': stats(next.map((h) => (h.next as number) - h.answered)),
      'releaseWritten → nextUpstreamWritten': stats(next.map((h) => (h.next as number) - h.written))
    }
    const summary: TraceSummary = { requests: complete.length, handovers: next.length, request, handover }
    writeFileSync(file, JSON.stringify(summary))
  })
}
