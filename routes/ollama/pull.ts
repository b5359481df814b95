import { PassThrough } from 'node:stream'
import type { FastifyPluginAsync } from 'fastify'
import { GatewayError } from '../../services/http/errors.js'
import { pullOnServers, pullVerdict, type PullServer } from '../../services/fleet/fleet-pull.js'
import { distinctUpstreams } from '../../services/fleet/upstream-catalog.js'
import { PullRequest } from './schemas.js'

/**
 * `POST /api/pull`: the model pulled on every server assigned it (a `*` assignment serves any
 * model, so it pulls too), in parallel, without a GPU lease (a download). Streamed: the servers'
 * progress lines as they come, each with `server`, then one verdict line. A client that leaves
 * cancels the pulls everywhere, as it would on one Ollama (partial downloads stay on each server
 * and the next pull resumes them); each server's outcome is logged either way.
 */
const pullRoute: FastifyPluginAsync = async (fastify) => {
  fastify.post('/api/pull', { schema: { body: PullRequest }, config: { auth: 'admin' } }, async (request, reply) => {
    const body = request.body as { model?: string, name?: string, insecure?: unknown, stream?: unknown }
    const model = body.model ?? body.name
    if (model == null || model === '') throw new GatewayError(400, 'model is required')
    const assignments = distinctUpstreams(fastify.inventory.current.candidates(model, 'llm'))
    if (assignments.length === 0) throw new GatewayError(404, `model '${model}' not found`)
    const servers: PullServer[] = assignments.map((a) => ({ name: a.name, url: a.url }))
    // Only the fields a pull takes: a body's other (or case-variant) keys never reach the servers.
    const upstreamBody: Record<string, unknown> = { model, ...(typeof body.insecure === 'boolean' ? { insecure: body.insecure } : {}) }
    const { signal, requestId } = request.exchange
    const log = (outcomes: Awaited<ReturnType<typeof pullOnServers>>): void => {
      for (const o of outcomes) {
        if (o.ok) request.log.info({ model, server: o.server }, 'pull done')
        else request.log.warn({ model, server: o.server, reason: o.reason }, 'pull failed')
      }
    }

    if (body.stream === false) {
      const outcomes = await pullOnServers(servers, upstreamBody, { signal, requestId, onLine: async () => {} })
      log(outcomes)
      const verdict = pullVerdict(outcomes)
      return 'error' in verdict ? reply.sendError(502, verdict.error) : verdict
    }

    const out = new PassThrough()
    const write = async (line: unknown): Promise<void> => {
      if (out.destroyed || out.writableEnded) return
      if (!out.write(JSON.stringify(line) + '\n')) {
        await new Promise<void>((resolve) => {
          const done = (): void => { out.off('drain', done); out.off('close', done); resolve() }
          out.once('drain', done)
          out.once('close', done)
        })
      }
    }
    void pullOnServers(servers, upstreamBody, { signal, requestId, onLine: write }).then(async (outcomes) => {
      log(outcomes)
      await write(pullVerdict(outcomes))
      out.end()
    })
    return reply.type('application/x-ndjson').send(out)
  })
}

export default pullRoute
