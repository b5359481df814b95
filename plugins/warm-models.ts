import fp from 'fastify-plugin'
import type { Assignment } from '../services/fleet/inventory.js'
import { lostSignal, requesterOf } from '../services/leases/lease-manager.js'
import { queueName } from '../services/leases/lease-store.js'
import { modelKey } from '../services/fleet/model-name.js'
import { distinctUpstreams } from '../services/fleet/upstream-catalog.js'

/**
 * WARM_MODELS: each model is loaded on every server assigned it once the gateway is ready, and
 * again on a server that is reachable after being unreachable (a restarted Ollama has nothing
 * loaded). A load is an empty-prompt `/api/generate` under the server's lease, so it waits for the
 * server's running request like any other, and carries the gateway's OLLAMA_KEEP_ALIVE.
 */
export default fp(async function warmModels (fastify) {
  const config = fastify.maestroConfig
  if (config.warmModels.length === 0) return
  const stopping = new AbortController()
  const running = new Set<string>()
  const keepAlive = config.keepAlive.mode === 'force' ? `,"keep_alive":${config.keepAlive.json}` : ''

  async function warm (assignment: Assignment, model: string): Promise<void> {
    const key = `${assignment.id}|${modelKey(model)}`
    if (running.has(key) || stopping.signal.aborted) return
    running.add(key)
    let lease: Awaited<ReturnType<typeof fastify.leases.acquire>> | undefined
    try {
      lease = await fastify.leases.acquire({
        queue: queueName('llm', modelKey(model)),
        candidates: [{ assignmentId: assignment.id, gpuIds: assignment.gpuIds, capacity: assignment.capacity }],
        info: { model, kind: 'llm', purpose: 'proxy' },
        requester: requesterOf(stopping.signal)
      })
      const res = await fetch(`${assignment.url}/api/generate`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: `{"model":${JSON.stringify(model)},"prompt":""${keepAlive},"stream":false}`,
        redirect: 'manual',
        signal: AbortSignal.any([lostSignal(lease), stopping.signal, AbortSignal.timeout(config.upstreamHeadersTimeoutMs)])
      })
      const text = await res.text()
      if (res.ok) {
        fastify.upstreams.noteServed(assignment, model)
        fastify.log.info({ model, assignment: assignment.name }, 'warm model loaded')
      } else {
        fastify.log.warn({ model, assignment: assignment.name, status: res.status, answer: text.slice(0, 200) }, 'warm model did not load')
      }
    } catch (err) {
      if (!stopping.signal.aborted) fastify.log.warn({ err, model, assignment: assignment.name }, 'warm model did not load')
    } finally {
      if (lease != null) await fastify.leases.release(lease)
      running.delete(key)
    }
  }

  /** Loads every warm model on each of its servers (or only on the assignments in `only`). */
  function warmAll (only?: Set<string>): void {
    for (const model of config.warmModels) {
      const servers = distinctUpstreams(fastify.inventory.current.candidates(model, 'llm'))
      if (servers.length === 0 && only == null) fastify.log.warn({ model }, 'WARM_MODELS names a model no llm assignment serves')
      for (const a of servers) if (only == null || only.has(a.id)) void warm(a, model)
    }
  }

  // An upstream back from unreachable, as the poller saw it: warm it again. A poll's verdict stands
  // until the next poll, so looking twice per poll period (an in-memory read) misses none.
  const lastHealth = new Map<string, string>()
  const comebacks = setInterval(() => {
    const back = new Set<string>()
    for (const { assignmentId, health } of fastify.upstreams.snapshots()) {
      if (health === 'up' && lastHealth.get(assignmentId) === 'unreachable') back.add(assignmentId)
      lastHealth.set(assignmentId, health)
    }
    if (back.size > 0) warmAll(back)
  }, Math.max(50, Math.floor(config.upstreamPollMs / 2)))
  comebacks.unref()

  fastify.addHook('onReady', async () => { warmAll() })
  fastify.addHook('preClose', async () => {
    clearInterval(comebacks)
    stopping.abort()
  })
}, { name: 'warm-models', dependencies: ['config', 'gpu-lease', 'inventory', 'upstream-poller'], fastify: '5.x' })
