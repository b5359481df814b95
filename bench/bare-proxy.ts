/**
 * The floor under the gateway in `npm run bench`: Fastify and @fastify/reply-from alone (the
 * gateway's fixed stack), forwarding `POST /api/generate` to the server of the body's model, with
 * nothing of the gateway's own: no lease, no log line, no metrics, no hooks. What the gateway
 * spends over this is its own; what this spends over nginx is the stack's.
 *
 * Env: INVENTORY_FILE (the benchmark's, for model → port), PORT.
 */
import { readFileSync } from 'node:fs'
import Fastify from 'fastify'
import replyFrom from '@fastify/reply-from'

interface BenchInventory { assignments: Array<{ model: string, port: number }> }

const inventory = JSON.parse(readFileSync(String(process.env.INVENTORY_FILE), 'utf8')) as BenchInventory
const upstreamOf = new Map(inventory.assignments.map((a) => [a.model, `http://127.0.0.1:${a.port}`]))

const app = Fastify({ logger: false })
await app.register(replyFrom, { undici: { keepAliveTimeout: 4000 } })
app.get('/health', async () => ({ status: 'ok' }))
app.post('/api/generate', (request, reply) => {
  const body = request.body as { model?: unknown }
  const upstream = upstreamOf.get(String(body.model))
  if (upstream === undefined) return reply.code(404).send({ error: 'model not found' })
  // the gateway forwards the body it parsed, re-serialised: so does this
  return reply.from(upstream + '/api/generate', { body: JSON.stringify(body), contentType: 'application/json' })
})
await app.listen({ host: '127.0.0.1', port: Number(process.env.PORT) })
process.once('SIGTERM', () => { void app.close().then(() => process.exit(0)) })
