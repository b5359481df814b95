// The lease API (issue 3): reserve, ping, release, status and cache clearing, on real MariaDB and Redis.
import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { assertAllFree, startFleet, type Gateway } from './helpers/gateway.js'
import { seedInventory } from './helpers/database.js'

interface Answer { status: number, body: any, headers: Headers }

async function call (gw: Gateway, method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<Answer> {
  const res = await fetch(gw.url + path, {
    method,
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    signal
  })
  const text = await res.text()
  return { status: res.status, body: text === '' ? undefined : JSON.parse(text), headers: res.headers }
}

const post = async (gw: Gateway, path: string, body?: unknown, signal?: AbortSignal): Promise<Answer> =>
  await call(gw, 'POST', path, body, signal)

async function status (gw: Gateway): Promise<any> {
  const answer = await call(gw, 'GET', '/gpu/status')
  if (answer.status !== 200) throw new Error(`status answered ${answer.status}`)
  return answer.body
}

/** Poll `/gpu/status` until `ready` holds (up to `ms`); answers the last status seen. */
async function statusWhen (gw: Gateway, ready: (s: any) => boolean, ms = 2000): Promise<any> {
  const deadline = performance.now() + ms
  for (;;) {
    const s = await status(gw)
    if (ready(s) || performance.now() > deadline) return s
    await sleep(20)
  }
}

/** A streamed generate that has its lease (headers arrived); `done` reads it to the end. */
async function streaming (gw: Gateway, model: string): Promise<{ done: Promise<string>, gpus: string | null }> {
  const res = await fetch(`${gw.url}/api/generate`, { method: 'POST', body: JSON.stringify({ model, prompt: 'long' }) })
  if (res.status !== 200) throw new Error(`generate answered ${res.status}: ${await res.text()}`)
  return { done: res.text(), gpus: res.headers.get('x-maestro-gpus') }
}

const generate = async (gw: Gateway, model: string): Promise<Response> =>
  await fetch(`${gw.url}/api/generate`, { method: 'POST', body: JSON.stringify({ model, prompt: 'x', stream: false }) })

t.test('reserve, see it in the status, keep it past the ttl with pings, release it', async (t) => {
  const ttl = 800
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [{ model: 'qwq', gpus: [0, 1] }],
    options: { LEASE_TTL_MS: ttl }
  })
  const gw = await fleet.replica()
  const before = Date.now()
  const reserved = await post(gw, '/gpu/reserve', { outputType: 'text', model: 'QwQ:latest' })
  const after = Date.now()
  t.equal(reserved.status, 200)
  const r = reserved.body
  t.match(r, { name: 'qwq-1', ip: '127.0.0.1', port: fleet.upstreams[0].port, gpuIds: fleet.gpuIds.join(',') })
  t.type(r.leaseId, 'string')
  t.same(Object.keys(r).sort(), ['expiresAt', 'gpuIds', 'ip', 'leaseId', 'name', 'port'])
  const expiresAt = Date.parse(r.expiresAt)
  t.ok(expiresAt >= before + ttl && expiresAt <= after + ttl, `expiresAt ${r.expiresAt} is one ttl after the grant`)

  const s = await status(gw)
  t.equal(s.gpus.length, 2)
  for (const [i, gpu] of s.gpus.entries()) {
    t.match(gpu, {
      id: fleet.gpuIds[i], name: `GPU ${fleet.gpuIds[i]}`, computer: 'box', leased: true,
      model: 'QwQ:latest', assignment: 'qwq-1', purpose: 'reservation'
    })
    t.ok(Date.parse(gpu.since) <= Date.now() && Date.parse(gpu.since) >= before - 1000, 'since is the grant time')
    t.ok(Date.parse(gpu.expiresAt) > Date.now(), 'expiresAt is ahead')
  }
  t.same(s.waiting, [])
  t.same(s.holds, [])

  // Pinged, by lease id and by GPU ids in turn, the reservation outlives its ttl three times over.
  const until = performance.now() + 3 * ttl
  let n = 0
  while (performance.now() < until) {
    const body = n++ % 2 === 0 ? { leaseId: r.leaseId } : { gpuIds: [fleet.gpuIds[1]] }
    t.same(await post(gw, '/gpu/ping', body).then((a) => [a.status, a.body]), [200, { message: 'Ping successful' }])
    await sleep(ttl / 4)
  }
  t.same(await fleet.heldGpus(), [...fleet.gpuIds].sort(), 'still held after three ttls')

  t.same(await post(gw, '/gpu/release', { leaseId: r.leaseId }).then((a) => [a.status, a.body]),
    [200, { message: 'GPU released successfully' }])
  t.same(await fleet.heldGpus(), [], 'released at once')
  t.same((await post(gw, '/gpu/release', { leaseId: r.leaseId })).status, 404, 'a second release finds nothing')
  t.same((await post(gw, '/gpu/ping', { leaseId: r.leaseId })).status, 404, 'a released lease cannot be pinged')
  await assertAllFree(t, gw)
})

t.test('a reservation that is not pinged expires, and a proxied request waiting for it proceeds', async (t) => {
  const ttl = 800
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'qwq', gpus: [0] }],
    options: { LEASE_TTL_MS: ttl }
  })
  const gw = await fleet.replica()
  const reserved = await post(gw, '/gpu/reserve', { outputType: 'text', model: 'qwq' })
  t.equal(reserved.status, 200)
  const started = performance.now()
  const res = await generate(gw, 'qwq')
  const waited = performance.now() - started
  t.equal(res.status, 200)
  t.equal((await res.json()).done, true)
  t.ok(waited >= ttl * 0.6 && waited < ttl + 2000, `the request waited ${Math.round(waited)} ms, about one ttl`)
  t.ok(Number(res.headers.get('x-maestro-queue-ms')) >= ttl * 0.6, 'and says it queued')
  t.equal((await post(gw, '/gpu/ping', { leaseId: reserved.body.leaseId })).status, 404, 'the lapsed reservation is gone')
  t.equal((await post(gw, '/gpu/release', { leaseId: reserved.body.leaseId })).status, 404)
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [])
  await assertAllFree(t, gw)
})

t.test('reserve queues behind a proxied stream and is granted when it ends; a client that leaves stops waiting', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'qwq', gpus: [0], simulator: { tokens: 12, tokenDelayMs: 50 } }]
  })
  const gw = await fleet.replica()

  // A reservation whose client gives up leaves the queue at once.
  const first = await streaming(gw, 'qwq')
  const leaving = new AbortController()
  const abandoned = post(gw, '/gpu/reserve', { outputType: 'text', model: 'qwq' }, leaving.signal).catch((err) => err)
  const queued = await statusWhen(gw, (s) => s.waiting.length > 0)
  t.same(queued.waiting.map(({ oldestSince: _, ...q }: any) => q), [{ kind: 'llm', model: 'qwq', depth: 1 }], 'the reservation waits in the model queue')
  t.ok(Number.isFinite(Date.parse(queued.waiting[0].oldestSince)), 'since a given time')
  t.match(queued.gpus[0], { leased: true, purpose: 'proxy', model: 'qwq' })
  leaving.abort()
  t.match(await abandoned, { name: 'AbortError' })
  const left = await statusWhen(gw, (s) => s.waiting.length === 0, 1000)
  t.same(left.waiting, [], 'the abandoned reservation left the queue')
  await first.done
  await assertAllFree(t, gw)

  // A reservation waits for the stream to end, then gets the GPU.
  const second = await streaming(gw, 'qwq')
  let settled = false
  const reservation = post(gw, '/gpu/reserve', { outputType: 'text', model: 'qwq' }).finally(() => { settled = true })
  await statusWhen(gw, (s) => s.waiting.length > 0)
  await sleep(150)
  t.equal(settled, false, 'no grant while the stream holds the GPU')
  const text = await second.done
  t.equal(text.trim().split('\n').length, 13, 'the stream was not disturbed')
  const granted = await reservation
  t.equal(granted.status, 200)
  t.equal(granted.body.gpuIds, fleet.gpuIds[0])
  t.ok(Number(granted.headers.get('x-maestro-queue-ms')) > 100, 'it says how long it queued')
  t.match((await status(gw)).gpus[0], { leased: true, purpose: 'reservation' })
  t.equal((await post(gw, '/gpu/release', { leaseId: granted.body.leaseId })).status, 200)
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [])
  await assertAllFree(t, gw)
})

t.test('unknown models 404, bad bodies 400, unknown leases 404', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'qwq', gpus: [0] }, { model: 'sdxl', kind: 'diffusor', gpus: [0] }]
  })
  const gw = await fleet.replica()
  const answer = async (path: string, body: unknown): Promise<[number, any]> => {
    const a = await post(gw, path, body)
    return [a.status, a.body]
  }
  t.same(await answer('/gpu/reserve', { outputType: 'text', model: 'nope' }), [404, { error: "model 'nope' not found" }])
  t.same(await answer('/gpu/reserve', { outputType: 'images', model: 'qwq' }), [404, { error: "model 'qwq' not found" }],
    'an llm is not an image model')
  t.same(await answer('/gpu/reserve', { outputType: 'speech', model: 'qwq' }), [404, { error: "model 'qwq' not found" }])
  t.same(await answer('/gpu/reserve', { outputType: 'text' }), [400, { error: 'model is required' }])
  t.same(await answer('/gpu/reserve', { outputType: 'text', model: '' }), [400, { error: 'model is required' }])
  t.same(await answer('/gpu/reserve', '[1]'), [400, { error: 'request body must be a JSON object' }])
  for (const body of [{ model: 'qwq' }, { outputType: 'video', model: 'qwq' }, { outputType: 1, model: 'qwq' }]) {
    const [code, error] = await answer('/gpu/reserve', body)
    t.equal(code, 400, JSON.stringify(body))
    t.match(error, { error: /outputType/ })
  }
  const broken = await answer('/gpu/reserve', '{"outputType":')
  t.equal(broken[0], 400)
  t.match(broken[1], { error: /invalid JSON/ })
  t.equal((await post(gw, '/gpu/reserve')).status, 400, 'no body')

  for (const path of ['/gpu/ping', '/gpu/release']) {
    t.same(await answer(path, {}), [400, { error: 'give either leaseId or gpuIds' }], `${path} {}`)
    t.same(await answer(path, { leaseId: 'x', gpuIds: ['1'] }), [400, { error: 'give either leaseId or gpuIds' }])
    for (const body of [{ gpuIds: [] }, { gpuIds: '1' }, { gpuIds: ['a b'] }, { gpuIds: ['1*'] }, { gpuIds: [-1] }, { leaseId: '' }, { leaseId: 7 }]) {
      t.equal((await post(gw, path, body)).status, 400, `${path} ${JSON.stringify(body)}`)
    }
    t.same(await answer(path, { leaseId: 'abc|1#1' }), [404, { error: "no live lease 'abc|1#1'" }])
    t.same(await answer(path, { gpuIds: [fleet.gpuIds[0]] }), [404, { error: `no live lease on GPU ${fleet.gpuIds[0]}` }])
    t.same(await answer(path, { gpuIds: ['999'] }), [404, { error: 'no live lease on GPU 999' }])
  }
  await assertAllFree(t, gw)
})

t.test('release by GPU ids frees the whole lease, also under an in-flight request', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'big', gpus: [0, 1] },
      { model: 'small', gpus: [1], simulator: { tokens: 10, tokenDelayMs: 50 } },
      { model: 'sdxl', kind: 'diffusor', gpus: [0] }
    ]
  })
  const gw = await fleet.replica()
  const [g1, g2] = fleet.gpuIds

  const big = await post(gw, '/gpu/reserve', { outputType: 'text', model: 'big' })
  t.equal(big.body.gpuIds, `${g1},${g2}`)
  // numbers are accepted too, as people type them
  t.same(await post(gw, '/gpu/release', { gpuIds: [Number(g2)] }).then((a) => [a.status, a.body]),
    [200, { message: 'GPU released successfully' }])
  t.same(await fleet.heldGpus(), [], 'both GPUs of the lease are free')
  t.equal((await post(gw, '/gpu/ping', { leaseId: big.body.leaseId })).status, 404)

  const image = await post(gw, '/gpu/reserve', { outputType: 'images', model: 'SDXL' })
  t.match(image.body, { name: 'sdxl-3', gpuIds: g1, port: fleet.upstreams[2].port })
  t.equal((await post(gw, '/gpu/release', { gpuIds: [g1, g2] })).status, 200, 'a free GPU among them is no error')
  t.same(await fleet.heldGpus(), [])

  // A GPU serving a request in flight is not freed from outside: that would put a second request on it.
  const stream = await streaming(gw, 'small')
  t.equal(stream.gpus, g2)
  const refused = await post(gw, '/gpu/release', { gpuIds: [g2] })
  t.equal(refused.status, 409)
  t.match(refused.body.error, /serving a request in flight/)
  t.same(await fleet.heldGpus(), [g2], 'the request keeps its GPU')
  t.equal((await stream.done).trim().split('\n').length, 11, 'the request itself runs on')
  await fleet.recorder.whenIdle()
  await assertAllFree(t, gw)
})

t.test('DELETE /gpu/cache reads the inventory again on every replica', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [{ model: 'qwq', gpus: [0], simulator: { models: ['qwq', 'fresh'] } }],
    // Only the cache clearing can explain a change seen within the test.
    options: { INVENTORY_REFRESH_MS: 600_000 }
  })
  const one = await fleet.replica()
  const two = await fleet.replica()
  for (const gw of [one, two]) {
    const res = await generate(gw, 'fresh')
    t.equal(res.status, 404, 'not in the inventory yet')
    t.equal(res.headers.get('x-maestro-assignment'), null, 'the gateway answered, not an upstream')
    t.same(await res.json(), { error: "model 'fresh' not found" })
  }
  await seedInventory(fleet.db.query, {
    computers: [],
    llms: ['fresh'],
    assignments: [{ name: 'fresh-1', model: 'fresh', port: fleet.upstreams[0].port, gpus: [Number(fleet.gpuIds[1])] }]
  })
  t.equal((await generate(one, 'fresh')).status, 404, 'cached: the new row is not seen yet')

  const cleared = await call(one, 'DELETE', '/gpu/cache')
  t.equal(cleared.status, 200)
  t.ok(cleared.body.removed >= 1, `removed ${cleared.body.removed}`)
  t.same(Object.keys(cleared.body), ['removed'])
  const res = await generate(one, 'fresh')
  t.equal(res.status, 200, 'routable at once on the replica that cleared')
  t.equal(res.headers.get('x-maestro-assignment'), 'fresh-1')
  t.equal(res.headers.get('x-maestro-gpus'), fleet.gpuIds[1])

  const started = performance.now()
  let other = await generate(two, 'fresh')
  while (other.status !== 200 && performance.now() - started < 1000) {
    await sleep(25)
    other = await generate(two, 'fresh')
  }
  t.equal(other.status, 200, `the other replica serves it ${Math.round(performance.now() - started)} ms later`)
  t.equal(other.headers.get('x-maestro-assignment'), 'fresh-1')

  const alias = await call(two, 'DELETE', '/cache')
  t.equal(alias.status, 200)
  t.ok(alias.body.removed >= 1)
  t.equal((await post(two, '/gpu/reserve', { outputType: 'text', model: 'fresh' })).status, 200, 'reservable too')
  t.equal((await post(one, '/gpu/release', { gpuIds: [fleet.gpuIds[1]] })).status, 200, 'released from the other replica')
  await assertAllFree(t, one)
  await assertAllFree(t, two)
})

t.test('/gpu/status counts the waiters per model, across replicas', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'Qwen2:7B', gpus: [0], simulator: { tokens: 16, tokenDelayMs: 50, models: ['Qwen2:7B'] } }]
  })
  const one = await fleet.replica()
  const two = await fleet.replica()
  const holder = await streaming(one, 'qwen2:7b')
  const finished: string[] = []
  const sent = Date.now()
  const waiting = [generate(one, 'Qwen2:7B'), generate(two, 'qwen2:7b')]
    .map(async (p, i) => await p.then(async (res) => { await res.text(); finished.push(`generate ${i}`); return res }))
  await statusWhen(one, (s) => s.waiting[0]?.depth === 2)
  const counted = Date.now()
  const reservation = post(two, '/gpu/reserve', { outputType: 'text', model: 'QWEN2:7B' })
    .then((a) => { finished.push('reservation'); return a })
  const seen = await statusWhen(one, (s) => s.waiting[0]?.depth === 3)
  t.same(seen.waiting.map(({ oldestSince: _, ...q }: any) => q), [{ kind: 'llm', model: 'qwen2:7b', depth: 3 }], 'the model key, tag and all')
  // Redis's clock and this process's: the same machine's
  const oldest = Date.parse(seen.waiting[0].oldestSince)
  t.ok(oldest >= sent - 5 && oldest <= counted + 5, `oldestSince ${seen.waiting[0].oldestSince}: the first waiter's arrival`)
  t.same((await status(two)).waiting, seen.waiting, 'both replicas see the same queue')
  t.match(seen.gpus, [{ leased: true, purpose: 'proxy', assignment: 'Qwen2:7B-1' }])
  await holder.done
  for (const res of await Promise.all(waiting)) t.equal(res.status, 200)
  const granted = await reservation
  t.equal(granted.status, 200)
  t.equal(finished.at(-1), 'reservation', 'the reservation, last to arrive, is served last')
  t.same((await status(one)).waiting, [])
  t.equal((await post(one, '/gpu/release', { leaseId: granted.body.leaseId })).status, 200)
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [])
  await assertAllFree(t, one)
})

t.test('with ADMIN_TOKEN set, the write routes need it and the status stays open', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'qwq', gpus: [0] }],
    options: { ADMIN_TOKEN: 'operator-secret' }
  })
  const gw = await fleet.replica()
  const as = (token?: string): Record<string, string> => ({
    'content-type': 'application/json', ...(token == null ? {} : { authorization: `Bearer ${token}` })
  })
  const send = async (method: string, path: string, body: unknown, token?: string): Promise<number> =>
    (await fetch(gw.url + path, { method, headers: as(token), body: body == null ? undefined : JSON.stringify(body) })).status
  const reserve = { outputType: 'text', model: 'qwq' }
  for (const token of [undefined, 'wrong']) {
    t.equal(await send('POST', '/gpu/reserve', reserve, token), 401, `reserve, token ${token}`)
    t.equal(await send('POST', '/gpu/ping', { gpuIds: ['1'] }, token), 401)
    t.equal(await send('POST', '/gpu/release', { gpuIds: ['1'] }, token), 401)
    t.equal(await send('DELETE', '/gpu/cache', undefined, token), 401)
    t.equal(await send('DELETE', '/cache', undefined, token), 401)
  }
  t.same(await fleet.heldGpus(), [], 'a refused reservation took nothing')
  t.equal(await send('GET', '/gpu/status', undefined), 200, 'status is open')
  const res = await fetch(`${gw.url}/gpu/reserve`, { method: 'POST', headers: as('operator-secret'), body: JSON.stringify(reserve) })
  t.equal(res.status, 200)
  const { leaseId } = await res.json() as { leaseId: string }
  t.equal(await send('POST', '/gpu/ping', { leaseId }, 'operator-secret'), 200)
  t.equal(await send('POST', '/gpu/release', { leaseId }, 'operator-secret'), 200)
  t.equal(await send('DELETE', '/gpu/cache', undefined, 'operator-secret'), 200)
  await assertAllFree(t, gw)
})
