/**
 * `POST /api/pull` for a fleet: the same pull on every server assigned the model, in parallel,
 * their progress lines merged into one stream. Plain TypeScript (no Fastify).
 */

export interface PullServer {
  /** The assignment name, shown as each progress line's `server`. */
  name: string
  /** `http://host:port` of the Ollama server. */
  url: string
}

export interface PullOutcome {
  server: string
  ok: boolean
  /** Why it failed (the server's own error text when it gave one). */
  reason?: string
}

export interface PullOptions {
  /** Aborted: every pull still running is cancelled (its connection closed, as `ollama pull`'s Ctrl-C does). */
  signal: AbortSignal
  /** Each server's progress line, `server` added; awaited, so a slow client slows the reading (backpressure). */
  onLine: (line: Record<string, unknown>) => Promise<void>
  requestId?: string
}

/** A progress line longer than this is not Ollama's: the server's pull is counted as failed. */
const MAX_LINE = 64 * 1024
/** How much of an error answer is read for its message. */
const MAX_ERROR_BODY = 4096

/**
 * Pulls on every server at once; resolves when all have ended, one outcome each, in the order
 * given. A server's own `{"status":"success"}` is not passed on as such (a client stops reading at
 * the first one): it becomes `{"status":"pulled on <server>","server"}`, and a server's error line
 * becomes `{"status":"failed on <server>: <error>","server"}`; the fleet's verdict is the caller's.
 */
export async function pullOnServers (servers: PullServer[], body: Record<string, unknown>, opts: PullOptions): Promise<PullOutcome[]> {
  return await Promise.all(servers.map(async (server) => await pullOne(server, body, opts)))
}

async function pullOne (server: PullServer, body: Record<string, unknown>, opts: PullOptions): Promise<PullOutcome> {
  const outcome = await pullOutcome(server, body, opts)
  if (!outcome.ok && !opts.signal.aborted) {
    await opts.onLine({ status: `failed on ${server.name}: ${outcome.reason ?? 'failed'}`, server: server.name }).catch(() => {})
  }
  return outcome
}

async function pullOutcome (server: PullServer, body: Record<string, unknown>, opts: PullOptions): Promise<PullOutcome> {
  const fail = (reason: string): PullOutcome => ({ server: server.name, ok: false, reason })
  try {
    const res = await fetch(`${server.url}/api/pull`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...(opts.requestId != null ? { 'x-request-id': opts.requestId } : {}) },
      body: JSON.stringify({ ...body, stream: true }),
      redirect: 'manual',
      signal: opts.signal
    })
    if (res.status !== 200) return fail(`${await errorText(res)} (HTTP ${res.status})`)
    return await readProgress(server, res, opts)
  } catch (err) {
    return fail(opts.signal.aborted ? 'cancelled: the client left' : `unreachable or failed (${errorCode(err)})`)
  }
}

async function readProgress (server: PullServer, res: Response, opts: PullOptions): Promise<PullOutcome> {
  const decoder = new TextDecoder()
  let pending = ''
  const reader = (res.body as ReadableStream<Uint8Array>).getReader()
  try {
    for (;;) {
      const { done, value } = await reader.read()
      pending += done ? decoder.decode() : decoder.decode(value, { stream: true })
      let newline: number
      while ((newline = pending.indexOf('\n')) >= 0) {
        const text = pending.slice(0, newline).trim()
        pending = pending.slice(newline + 1)
        if (text === '') continue
        const verdict = await progressLine(server, text, opts)
        if (verdict != null) return verdict
      }
      if (pending.length > MAX_LINE) return { server: server.name, ok: false, reason: 'progress line too long' }
      if (done) break
    }
    if (pending.trim() !== '') {
      const verdict = await progressLine(server, pending.trim(), opts)
      if (verdict != null) return verdict
    }
    return { server: server.name, ok: false, reason: 'the stream ended before success' }
  } finally {
    await reader.cancel().catch(() => {})
  }
}

/** Passes one line on; an outcome when the line ends this server's pull. */
async function progressLine (server: PullServer, text: string, opts: PullOptions): Promise<PullOutcome | undefined> {
  let line: unknown
  try {
    line = JSON.parse(text)
  } catch {
    return { server: server.name, ok: false, reason: 'answered a line that is not JSON' }
  }
  if (line == null || typeof line !== 'object' || Array.isArray(line)) return { server: server.name, ok: false, reason: 'answered a line that is not a JSON object' }
  const record = line as Record<string, unknown>
  if (record.error != null) return { server: server.name, ok: false, reason: String(record.error) }
  if (record.status === 'success') {
    await opts.onLine({ status: `pulled on ${server.name}`, server: server.name })
    return { server: server.name, ok: true }
  }
  await opts.onLine({ ...record, server: server.name })
  return undefined
}

/** The `error` of a JSON error answer, else the start of its text. */
async function errorText (res: Response): Promise<string> {
  const text = (await res.text().catch(() => '')).slice(0, MAX_ERROR_BODY)
  try {
    const parsed = JSON.parse(text) as { error?: unknown }
    if (typeof parsed?.error === 'string') return parsed.error
  } catch {}
  return text.trim() === '' ? 'no answer' : text.trim().slice(0, 200)
}

function errorCode (err: unknown): string {
  const e = err as { code?: string, cause?: { code?: string }, message?: string }
  return e.cause?.code ?? e.code ?? e.message ?? 'failed'
}

/** The fleet's last line: success only when every server succeeded, else each failure named. */
export function pullVerdict (outcomes: PullOutcome[]): { status: 'success' } | { error: string } {
  const failed = outcomes.filter((o) => !o.ok)
  if (failed.length === 0) return { status: 'success' }
  return { error: failed.map((o) => `${o.server}: ${o.reason ?? 'failed'}`).join('; ') }
}
