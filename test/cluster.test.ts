// Three replicas on one Redis: no GPU is ever shared, each model is served in arrival order, and a
// multi-GPU request is not starved by single-GPU traffic on its GPUs (issue 3).
import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { performance } from 'node:perf_hooks'
import { Ollama } from 'ollama'
import { startFleet, watchLeases, type Gateway, type TestFleet } from './helpers/gateway.js'
import type { RecordedRequest } from './helpers/upstream-simulator.js'

type Kind = 'llm' | 'diffusor'

/** The unique tag a test request carries, wherever the route keeps its text. */
function tagOf (r: RecordedRequest): string | undefined {
  const b = r.body
  if (b == null || typeof b !== 'object') return undefined
  if (typeof b.prompt === 'string') return b.prompt
  if (typeof b.input === 'string') return b.input
  if (Array.isArray(b.input) && typeof b.input[0] === 'string') return b.input[0]
  if (Array.isArray(b.messages) && typeof b.messages[0]?.content === 'string') return b.messages[0].content
  return undefined
}

/** Every request the fleet's simulators saw with one of `tags`, in the order they arrived. */
function seenInOrder (fleet: TestFleet, tags: Set<string>): Array<{ tag: string, at: number, upstream: number }> {
  const seen: Array<{ tag: string, at: number, upstream: number }> = []
  fleet.upstreams.forEach((sim, upstream) => {
    for (const r of sim.requests) {
      const tag = tagOf(r)
      if (tag !== undefined && tags.has(tag)) seen.push({ tag, at: r.at, upstream })
    }
  })
  return seen.sort((a, b) => a.at - b.at)
}

/**
 * One request through a replica, in one of the ways clients send them. Resolves with the HTTP
 * status (200 when the answer was complete and well-formed), or throws.
 */
async function send (gw: Gateway, kind: Kind, model: string, tag: string, variant: number, signal?: AbortSignal): Promise<number> {
  if (kind === 'diffusor') {
    const res = await fetch(`${gw.url}/txt2img`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model, prompt: tag }), signal
    })
    const body = Buffer.from(await res.arrayBuffer())
    if (res.status === 200 && body.subarray(1, 4).toString() !== 'PNG') throw new Error('txt2img answered something else than a PNG')
    return res.status
  }
  const ollama = new Ollama({ host: gw.url, fetch: (input, init) => fetch(input, { ...init, signal: signal ?? init?.signal }) })
  switch (variant % 5) {
    case 0: {
      let last: any
      for await (const part of await ollama.generate({ model, prompt: tag, stream: true })) last = part
      if (last?.done !== true) throw new Error('generate stream ended without done')
      return 200
    }
    case 1: {
      const r = await ollama.chat({ model, messages: [{ role: 'user', content: tag }] })
      if (r.done !== true) throw new Error('chat not done')
      return 200
    }
    case 2: {
      const r = await ollama.embed({ model, input: tag })
      if (r.embeddings.length !== 1) throw new Error('embed gave no vector')
      return 200
    }
    case 3: {
      let last: any
      for await (const part of await ollama.chat({ model, messages: [{ role: 'user', content: tag }], stream: true })) last = part
      if (last?.done !== true) throw new Error('chat stream ended without done')
      return 200
    }
    default: {
      const res = await fetch(`${gw.url}/api/generate`, {
        method: 'POST', body: JSON.stringify({ model, prompt: tag, stream: false }), signal
      })
      const body = await res.json() as { done?: boolean }
      if (res.status === 200 && body.done !== true) throw new Error('generate not done')
      return res.status
    }
  }
}

interface FleetStatus {
  gpus: Array<{ id: string, leased: boolean }>
  waiting: Array<{ kind: string, model: string, depth: number }>
}

/** The cluster-wide lease state, as any replica's GET /gpu/status tells it. */
async function fleetStatus (gw: Gateway): Promise<FleetStatus> {
  const res = await fetch(`${gw.url}/gpu/status`)
  if (res.status !== 200) throw new Error(`/gpu/status answered ${res.status}`)
  return await res.json() as FleetStatus
}

/** Waiters in a model's queue across the cluster. */
async function queueDepth (gw: Gateway, kind: Kind, model: string): Promise<number> {
  return (await fleetStatus(gw)).waiting.find((w) => w.kind === kind && w.model === model)?.depth ?? 0
}

async function until (what: string, check: () => Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const deadline = performance.now() + timeoutMs
  while (!(await check())) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(2)
  }
}

t.test('three replicas, ~300 mixed requests over overlapping GPU sets', async (t) => {
  // GPU 0 and 1 each serve alpha alone and beta together; GPU 2 is shared by an LLM and a
  // diffusion server; `blocker` spans every GPU so the test can hold them all.
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1],
    upstreams: [
      { model: 'alpha', gpus: [0], simulator: { tokens: 4, tokenDelayMs: 12 } },
      { model: 'alpha', gpus: [1], simulator: { tokens: 4, tokenDelayMs: 12 } },
      { model: 'beta', gpus: [0, 1], simulator: { tokens: 3, tokenDelayMs: 8 } },
      { model: 'gamma', gpus: [2], simulator: { tokens: 3, tokenDelayMs: 8 } },
      { model: 'sd', kind: 'diffusor', gpus: [2], simulator: { imageDelayMs: 15 } },
      { model: 'blocker', gpus: [0, 1, 2], simulator: { tokens: 100000, tokenDelayMs: 20 } }
    ],
    // a ttl no stall of this busy process comes near: these tests are about order and sharing
    options: { STARVATION_MS: 500, LEASE_TTL_MS: 10_000 }
  })
  const replicas = [await fleet.replica(), await fleet.replica(), await fleet.replica()]
  const models: Array<{ model: string, kind: Kind, ordered: number, slots: number }> = [
    { model: 'alpha', kind: 'llm', ordered: 60, slots: 2 },
    { model: 'beta', kind: 'llm', ordered: 30, slots: 1 },
    { model: 'gamma', kind: 'llm', ordered: 40, slots: 1 },
    { model: 'sd', kind: 'diffusor', ordered: 30, slots: 1 }
  ]

  await t.test('each model is served in the order its requests arrived, whichever replica took them', async (t) => {
    // Hold every GPU, so each request stays queued until all have arrived; arrival order is then
    // defined: a request is sent only once the store counts the one before it in the queue.
    const leasesKept = watchLeases(t, replicas)
    const blocker = new AbortController()
    const blocked = send(replicas[0], 'llm', 'blocker', 'hold-everything', 0, blocker.signal).catch(() => 'aborted')
    await until('the blocker to hold every GPU', async () => (await fleet.heldGpus()).length === 3)

    const sent = new Map<string, string[]>()
    const answers: Array<Promise<number | string>> = []
    try {
      await Promise.all(models.map(async ({ model, kind, ordered }, m) => {
        const order: string[] = []
        sent.set(model, order)
        for (let i = 0; i < ordered; i++) {
          const tag = `${model} ordered #${i}`
          order.push(tag)
          const gw = replicas[(i + m) % replicas.length]
          answers.push(send(gw, kind, model, tag, i).catch((err: Error) => err.message))
          await until(`${tag} to be queued`, async () => await queueDepth(replicas[(i + 1) % 3], kind, model) === i + 1)
        }
      }))
    } finally {
      blocker.abort()
    }
    const total = models.reduce((n, m) => n + m.ordered, 0)
    t.comment(`${total} requests queued across 3 replicas; releasing the GPUs`)
    const started = performance.now()
    await blocked
    const statuses = await Promise.all(answers)
    t.comment(`drained in ${Math.round(performance.now() - started)} ms`)
    t.same(statuses.filter((s) => s !== 200), [], 'every request answered 200')

    for (const { model, slots } of models) {
      const expected = sent.get(model) as string[]
      const seen = seenInOrder(fleet, new Set(expected)).map((s) => s.tag)
      t.equal(seen.length, expected.length, `${model}: every request reached an upstream once`)
      if (slots === 1) {
        t.same(seen, expected, `${model}: served in arrival order`)
      } else {
        // Two servers: two requests granted in the same instant may reach their servers in either
        // order, so a request may be seen at most one place from where it was sent.
        const displaced = seen.map((tag, i) => ({ tag, by: i - expected.indexOf(tag) })).filter((d) => Math.abs(d.by) > 1)
        t.same(displaced, [], `${model}: served in arrival order (two at a time)`)
        t.comment(`${model}: ${seen.filter((tag, i) => tag !== expected[i]).length} of ${seen.length} reached their server one place off (granted together)`)
      }
    }
    await leasesKept()
    await fleet.recorder.whenIdle()
    t.same(fleet.recorder.overlaps, [], 'no GPU ever held by two requests')
  })

  await t.test('a free-for-all mix from every replica', async (t) => {
    // the first subtest held every GPU with one request: forget it, so "in parallel" is this mix's own
    fleet.recorder.reset()
    const leasesKept = watchLeases(t, replicas)
    const jobs: Array<{ model: string, kind: Kind }> = []
    for (let i = 0; i < 140; i++) jobs.push(models[i % models.length])
    let next = 0
    const failures: string[] = []
    const started = performance.now()
    // 24 clients at once, each taking the next job and a replica in turn.
    await Promise.all(Array.from({ length: 24 }, async (_, client) => {
      while (next < jobs.length) {
        const i = next++
        const { model, kind } = jobs[i]
        const status = await send(replicas[(i + client) % 3], kind, model, `${model} mixed #${i}`, i + client)
          .catch((err: Error) => `${err.message}`)
        if (status !== 200) failures.push(`${model} #${i}: ${status}`)
      }
    }))
    t.comment(`${jobs.length} mixed requests in ${Math.round(performance.now() - started)} ms`)
    t.same(failures, [], 'every request answered 200')
    await leasesKept()
    await fleet.recorder.whenIdle()
    t.same(fleet.recorder.overlaps, [], 'no GPU ever held by two requests')
    t.ok(fleet.recorder.maxConcurrent >= 2, `GPUs were used in parallel (up to ${fleet.recorder.maxConcurrent} at once)`)
  })

  // the last answers' releases run just after they end: wait for them (the assertion says if they never come)
  await until('every GPU to be free', async () => (await fleet.heldGpus()).length === 0).catch(() => {})
  t.same(await fleet.heldGpus(), [], 'every GPU free at the end')
  const status = await fleetStatus(replicas[1])
  t.same(status.waiting, [], 'no waiter left behind')
  t.same(status.gpus.filter((g) => g.leased), [], '/gpu/status: every GPU free')
})

t.test('a two-GPU request is not starved by an endless stream of one-GPU requests', async (t) => {
  const STARVATION_MS = 500
  const SERVICE_MS = 60
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'alpha', gpus: [0], simulator: { tokens: 6, tokenDelayMs: SERVICE_MS / 6 } },
      { model: 'alpha', gpus: [1], simulator: { tokens: 6, tokenDelayMs: SERVICE_MS / 6 } },
      { model: 'beta', gpus: [0, 1], simulator: { tokens: 6, tokenDelayMs: SERVICE_MS / 6 } }
    ],
    options: { STARVATION_MS, LEASE_TTL_MS: 10_000 }
  })
  const replicas = [await fleet.replica(), await fleet.replica(), await fleet.replica()]
  const leasesKept = watchLeases(t, replicas)

  // Nine clients keep alpha's two servers busy with a queue behind them until told to stop.
  let stop = false
  let alphaServed = 0
  const failures: string[] = []
  const stream = Promise.all(Array.from({ length: 9 }, async (_, client) => {
    for (let i = 0; !stop; i++) {
      const status = await send(replicas[client % 3], 'llm', 'alpha', `alpha ${client}/${i}`, 0).catch((err: Error) => err.message)
      if (status === 200) alphaServed++
      else failures.push(String(status))
    }
  }))
  await sleep(300)
  await until('alpha to have a queue', async () => await queueDepth(replicas[1], 'llm', 'alpha') >= 3)

  const servedBefore = alphaServed
  const started = performance.now()
  const status = await send(replicas[2], 'llm', 'beta', 'beta under pressure', 0)
  const answered = performance.now() - started
  const reached = fleet.upstreams[2].requests.find((r) => tagOf(r) === 'beta under pressure')
  const waited = (reached?.at ?? Infinity) - started
  const servedMeanwhile = alphaServed - servedBefore
  stop = true
  await stream

  t.equal(status, 200, 'beta answered')
  t.comment(`beta reached its server after ${Math.round(waited)} ms and was answered after ${Math.round(answered)} ms ` +
    `(STARVATION_MS ${STARVATION_MS}, service ${SERVICE_MS} ms); ${servedMeanwhile} alpha requests were served meanwhile`)
  t.ok(servedMeanwhile >= 4, 'alpha kept both GPUs busy while beta waited')
  // Held GPUs wait for the running request on each: starvation threshold plus one service time,
  // with room for a two-core machine running two test files at once (1.6 s seen with the cores
  // saturated). A starved beta would wait for as long as alpha's stream lasts, far beyond this.
  t.ok(waited < STARVATION_MS + SERVICE_MS + 3000, `beta served within STARVATION_MS + one service time (+3 s slack): ${Math.round(waited)} ms`)
  t.same(failures, [], 'every alpha request answered 200')
  await leasesKept()
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [], 'no GPU ever held by two requests')
  await until('every GPU to be free', async () => (await fleet.heldGpus()).length === 0).catch(() => {})
  t.same(await fleet.heldGpus(), [], 'every GPU free at the end')
})
