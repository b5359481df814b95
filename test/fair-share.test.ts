// Fair share and priority between API keys (CONTRACT 12.3), end to end: keys from the api_keys
// table, the lease engine's per-client turns and aging, one GPU, the simulator, the ollama client.
// Assertions compare with what else the same run served (how many other requests went first), not
// with wall-clock budgets.
import t from 'tap'
import { Ollama } from 'ollama'
import { startFleet, assertAllFree, type Gateway } from './helpers/gateway.js'
import { eventually, insertKey } from './helpers/api-keys.js'

const client = (gw: Gateway, secret: string): Ollama => new Ollama({ host: gw.url, headers: { Authorization: `Bearer ${secret}` } })

async function waiting (gw: Gateway): Promise<number> {
  const status = await (await fetch(gw.url + '/gpu/status')).json() as { waiting: Array<{ depth: number }> }
  return status.waiting.reduce((sum, q) => sum + q.depth, 0)
}

t.test('key A queues 100 requests on one GPU, then key B sends one: B is served within a few of A\'s, and all of A\'s complete', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], migrate: true, upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 3, tokenDelayMs: 5 } }] })
  await insertKey(fleet.db.query, 'a', 'secret-a')
  await insertKey(fleet.db.query, 'b', 'secret-b')
  const gw = await fleet.replica()
  const a = client(gw, 'secret-a')
  const b = client(gw, 'secret-b')

  // The GPU is reserved while the queue fills, so that all of A's requests are waiting before B's.
  const reserved = await fetch(gw.url + '/gpu/reserve', { method: 'POST', headers: { authorization: 'Bearer secret-a' }, body: '{"outputType":"text","model":"m"}' })
  const { leaseId } = await reserved.json() as { leaseId: string }
  const finished: string[] = []
  const flood = Array.from({ length: 100 }, async (_, i) => {
    const answer = await a.generate({ model: 'm', prompt: `a${i}` })
    finished.push('a')
    return answer.done
  })
  t.ok(await eventually(async () => await waiting(gw) === 100, 10_000), 'A\'s 100 requests wait in the model\'s queue')
  const served = b.generate({ model: 'm', prompt: 'b' }).then((answer) => { finished.push('b'); return answer })
  t.ok(await eventually(async () => await waiting(gw) === 101), 'then B\'s, behind them')
  await fetch(gw.url + '/gpu/release', { method: 'POST', headers: { authorization: 'Bearer secret-a', 'content-type': 'application/json' }, body: JSON.stringify({ leaseId }) })
  t.equal((await served).done, true, 'B is served')
  const aFirst = finished.indexOf('b')
  t.ok(aFirst <= 2, `B waited for ${aFirst} of A's requests (its turn comes round), not for the 100 queued before it`)
  t.same(await Promise.all(flood), Array(100).fill(true), 'every one of A\'s requests completes')
  t.equal(fleet.recorder.peak(fleet.gpuIds[0]), 1, 'one at a time on the GPU')
  t.same(fleet.recorder.overlaps, [], 'no overlap')
  await assertAllFree(t, gw)
})

t.test('priority: high goes first; with aging a low key\'s request still completes under a stream of high ones, without aging it waits', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], migrate: true, upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 3, tokenDelayMs: 5 } }] })
  await insertKey(fleet.db.query, 'high', 'secret-high', { priority: 'high' })
  await insertKey(fleet.db.query, 'low', 'secret-low', { priority: 'low' })
  const AGING_MS = 300
  const aging = await fleet.replica({ PRIORITY_AGING_MS: AGING_MS })
  const noAging = await fleet.replica({ PRIORITY_AGING_MS: 600_000 })

  /** Keeps 3 high requests in flight or waiting until stopped; counts those served. */
  const stream = (gw: Gateway): { served: () => number, stop: () => Promise<void> } => {
    const high = client(gw, 'secret-high')
    let running = true
    let served = 0
    const loops = Array.from({ length: 3 }, async () => {
      while (running) {
        await high.generate({ model: 'm', prompt: 'h' })
        served++
      }
    })
    return { served: () => served, stop: async () => { running = false; await Promise.all(loops) } }
  }

  // Without aging: the low request is passed over as long as high ones wait.
  let highs = stream(noAging)
  await eventually(async () => highs.served() >= 5)
  let lowDone = false
  const starved = client(noAging, 'secret-low').generate({ model: 'm', prompt: 'l' }).then(() => { lowDone = true })
  const from = highs.served()
  await eventually(async () => highs.served() - from >= 60, 20_000)
  t.notOk(lowDone, `without aging the low request is still waiting after ${highs.served() - from} high ones`)
  await highs.stop()
  await starved
  t.ok(lowDone, 'and is served once the high stream stops')

  // With aging: it is served while the stream goes on.
  highs = stream(aging)
  await eventually(async () => highs.served() >= 5)
  const started = highs.served()
  const startedAt = performance.now()
  await client(aging, 'secret-low').generate({ model: 'm', prompt: 'l' })
  const passedOver = highs.served() - started
  const waitedMs = performance.now() - startedAt
  await highs.stop()
  t.ok(passedOver >= 1, `high requests went first meanwhile (${passedOver})`)
  t.ok(passedOver < 60, `served after ${passedOver} high requests (${Math.round(waitedMs)} ms; aging ${AGING_MS} ms), not starved`)
  t.ok(waitedMs >= AGING_MS, 'not before it had aged')
  await assertAllFree(t, aging)
})
