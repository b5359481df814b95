// Parallel slots end to end (CONTRACT 12.1): two replicas, a capacity-4 Ollama (the simulator's
// OLLAMA_NUM_PARALLEL 4) and a second model's server on the same GPU.
import t from 'tap'
import { performance } from 'node:perf_hooks'
import { startFleet } from './helpers/gateway.js'

const TOKENS = 15
const TOKEN_MS = 20
const SERVICE_MS = TOKENS * TOKEN_MS

t.test('a capacity-4 server runs 4 requests at once, never more, and never beside another model on its GPU', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    migrate: true,
    upstreams: [
      { model: 'wide', gpus: [0], simulator: { numParallel: 4, tokens: TOKENS, tokenDelayMs: TOKEN_MS, resident: ['wide'], loadMs: 0 } },
      { model: 'narrow', gpus: [0], simulator: { tokens: TOKENS, tokenDelayMs: TOKEN_MS, resident: ['narrow'], loadMs: 0 } }
    ],
    options: { STARVATION_MS: 300 }
  })
  await fleet.db.query("UPDATE assignments SET max_parallel = 4 WHERE model_name = 'wide'")
  const replicas = [await fleet.replica(), await fleet.replica()]

  const generate = async (url: string, model: string, prompt: string): Promise<number> => {
    const res = await fetch(`${url}/api/generate`, { method: 'POST', body: JSON.stringify({ model, prompt, stream: false }) })
    await res.arrayBuffer()
    return res.status
  }

  // 16 clients, 3 requests each: straight to the server (which runs 4 and queues the rest
  // itself: what 4 slots allow on this machine now), then half through each replica
  const PER_CLIENT = 3
  const run = async (urlOf: (c: number) => string): Promise<{ ms: number, statuses: number[] }> => {
    const started = performance.now()
    const statuses = await Promise.all(Array.from({ length: 16 }, async (_, c) => {
      const out: number[] = []
      for (let i = 0; i < PER_CLIENT; i++) out.push(await generate(urlOf(c), 'wide', `client ${c} #${i}`))
      return out
    }))
    return { ms: performance.now() - started, statuses: statuses.flat() }
  }
  const direct = await run(() => `http://127.0.0.1:${fleet.upstreams[0].port}`)
  // (the server itself records what it queued beyond its 4 as overlaps: that was not the gateway)
  await fleet.recorder.whenIdle()
  fleet.recorder.peakByGpu.clear()
  fleet.recorder.overlaps.length = 0
  const gateway = await run((c) => replicas[c % 2].url)
  t.ok(gateway.statuses.every((s) => s === 200), 'every request answered 200')
  const ratio = direct.ms / gateway.ms
  // How fast is the bench's business ((f): a capacity-4 server, gateway vs direct), not a test's.
  t.comment(`48 requests of ${SERVICE_MS} ms of work, 16 clients: ${Math.round(direct.ms)} ms straight to the 4-slot server, ${Math.round(gateway.ms)} ms through two replicas (${ratio.toFixed(2)}x; ideal ${(16 * PER_CLIENT / 4) * SERVICE_MS} ms)`)
  t.equal(fleet.recorder.peakByGpu.get(fleet.gpuIds[0]), 4, 'the server saw 4 at once, never more')
  t.same(fleet.recorder.overlaps, [], 'nothing beyond capacity')

  // now both models at once: the other one gets the GPU only with all 4 slots free
  fleet.recorder.together.length = 0
  const mixed = await Promise.all([
    ...Array.from({ length: 8 }, async (_, c) => await generate(replicas[c % 2].url, 'wide', `mixed ${c}`)),
    ...Array.from({ length: 2 }, async (_, c) => await generate(replicas[c % 2].url, 'narrow', `narrow ${c}`))
  ])
  t.ok(mixed.every((s) => s === 200), 'both models served')
  const shared = fleet.recorder.together.filter((x) => new Set(x.models).size > 1)
  t.same(shared, [], 'the two models never ran on the GPU together')
  t.same(fleet.recorder.overlaps, [])
  await fleet.recorder.whenIdle()
  t.same(await fleet.heldGpus(), [], 'every slot released')
})

t.test('/gpu/status and /metrics show slots in use and capacity', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    migrate: true,
    upstreams: [{ model: 'wide', gpus: [0], simulator: { numParallel: 4, tokens: 50, tokenDelayMs: 20, resident: ['wide'], loadMs: 0 } }]
  })
  await fleet.db.query('UPDATE assignments SET max_parallel = 4')
  const gw = await fleet.replica()
  const streams = Array.from({ length: 2 }, async () => {
    const res = await fetch(`${gw.url}/api/generate`, { method: 'POST', body: JSON.stringify({ model: 'wide', prompt: 'x' }) })
    await res.arrayBuffer()
  })
  let status: any
  for (let i = 0; i < 100; i++) {
    status = await (await fetch(`${gw.url}/gpu/status`)).json()
    if (status.gpus[0].slotsUsed === 2) break
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  t.match(status.gpus[0], { leased: true, slotsUsed: 2, capacity: 4, model: 'wide' })
  const metrics = await (await fetch(`${gw.url}/metrics`)).text()
  t.match(metrics, /^maestro_slots_in_use 2$/m)
  t.match(metrics, /^maestro_slot_capacity 4$/m)
  await Promise.all(streams)
  status = await (await fetch(`${gw.url}/gpu/status`)).json()
  t.match(status.gpus[0], { leased: false, slotsUsed: 0, capacity: 4 })
})
