import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Assignment } from '../../services/fleet/inventory.js'
import { distinctUpstreams } from '../../services/fleet/upstream-catalog.js'
import { ClientLimitError } from '../../services/clients/client-limits.js'

/** The length of the Go duration unit (`ns`, `us`, `µs`, `μs`, `ms`, `s`, `m`, `h`) at `i`, 0 if none. */
function unitLength (text: string, i: number): number {
  if (text[i + 1] === 's' && 'nuµμm'.includes(text[i])) return 2
  return 'smh'.includes(text[i]) ? 1 : 0
}

/**
 * Whether `text` is a Go duration that is zero (`0`, `0s`, `0m0s`, `-0.0h`, `000ms`...): Ollama
 * unloads at once. One pass: a sign, then zeros, each run of them followed by at most one `.`
 * (and more zeros) and at most one unit. The same strings as the pattern it replaces,
 * /^[-+]?(?:0+(?:\.0*)?(?:ns|us|µs|μs|ms|s|m|h)?)+$/, which backtracked exponentially on `000…0x`.
 */
export function isZeroDuration (text: string): boolean {
  let i = text[0] === '-' || text[0] === '+' ? 1 : 0
  let last: 'nothing' | 'zero' | 'point' | 'unit' = 'nothing'
  while (i < text.length) {
    if (text[i] === '0') {
      last = 'zero'
      i++
    } else if (text[i] === '.' && last === 'zero') {
      last = 'point'
      i++
    } else {
      const unit = last === 'zero' || last === 'point' ? unitLength(text, i) : 0
      if (unit === 0) return false
      last = 'unit'
      i += unit
    }
  }
  return last !== 'nothing'
}

/** `keep_alive` 0, or a duration string that is zero. */
export function isZeroKeepAlive (value: unknown): boolean {
  return value === 0 || (typeof value === 'string' && isZeroDuration(value))
}

/**
 * Ollama's unload request: `/api/generate` with no prompt (and no images) or `/api/chat` with no
 * messages, and `keep_alive` 0. Without `keep_alive: 0` the same request only loads the model: that
 * one is an ordinary leased request on one server.
 */
export function isUnloadRequest (path: string, body: Record<string, unknown>): boolean {
  if (!isZeroKeepAlive(body.keep_alive)) return false
  if (path === '/api/generate') {
    const images = body.images
    return (body.prompt == null || body.prompt === '') && !(Array.isArray(images) && images.length > 0)
  }
  if (path === '/api/chat') return body.messages == null || (Array.isArray(body.messages) && body.messages.length === 0)
  return false
}

/** The servers (one assignment each) among `candidates` that have `model` loaded, as last polled. */
function loadedOn (fastify: FastifyInstance, candidates: Assignment[], model: string): Assignment[] {
  return candidates.filter((a) => fastify.upstreams.isLoaded(a, model))
}

/**
 * Unloads `model` on every server where it is loaded, one after the other, each under its own
 * lease (an unload waits for the server's running request, like any other). Answers as Ollama
 * does (`done_reason: "unload"`), or 502 naming the servers where it failed.
 */
export async function unloadEverywhere (fastify: FastifyInstance, request: FastifyRequest, reply: FastifyReply, path: '/api/generate' | '/api/chat', model: string): Promise<unknown> {
  const candidates = distinctUpstreams(fastify.inventory.current.candidates(model, 'llm'))
  if (candidates.length === 0) return reply.sendError(404, `model '${model}' not found`)
  // A key's scope holds even where the model is loaded nowhere (nothing to lease): 403.
  fastify.clientLimits.checkModel(request.client, model)
  const failures: string[] = []
  for (const assignment of loadedOn(fastify, candidates, model)) {
    const body = path === '/api/chat' ? { model, messages: [], keep_alive: 0 } : { model, prompt: '', keep_alive: 0 }
    try {
      const res = await fastify.withLease(request, reply, { kind: 'llm', model, candidates: [assignment] }, async (upstream) => await upstream.post(path, body))
      if (!res.ok) failures.push(`${assignment.name}: ${(await res.text()).slice(0, 200)} (HTTP ${res.status})`)
      else {
        await res.body?.cancel()
        fastify.upstreams.noteUnloaded(assignment, model)
        request.log.info({ model, assignment: assignment.name }, 'model unloaded')
      }
    } catch (err) {
      // the client's own limits (429) are its answer, not a server's failure
      if (request.exchange.closed || err instanceof ClientLimitError) throw err
      failures.push(`${assignment.name}: ${(err as Error).message}`)
    }
  }
  if (failures.length > 0) return reply.sendError(502, `unload failed on ${failures.join('; ')}`)
  const answer = { model, created_at: new Date().toISOString(), ...(path === '/api/chat' ? { message: { role: 'assistant', content: '' } } : { response: '' }), done: true, done_reason: 'unload' }
  return reply.type('application/json; charset=utf-8').send(answer)
}
