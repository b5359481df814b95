// A key's scope holds on every route it can call (CONTRACT 18): its `models` list on /gpu/reserve,
// /api/show, uploads and unloads; a reservation holds one of its maxConcurrent slots and counts in
// its rpm until released or expired; a reservation is its key's own (another key's ping or
// release answers as for an unknown lease, and changes nothing; the admin token's acts on any);
// and a multipart body's `model` is checked as the server will read it. Real MariaDB (keys
// written into api_keys), Redis and simulators.
import t, { type Test } from 'tap'
import { assertAllFree, startFleet, type Gateway, type TestFleet } from './helpers/gateway.js'
import { clientTokens, eventually, insertKey } from './helpers/api-keys.js'
import type { SpeechSimulator } from './helpers/upstream-simulator.js'
import { MemoryClientLimitStore, RedisClientLimitStore, type ClientLimitStore } from '../services/clients/client-limits.js'
import { redisClients, testPrefix } from './helpers/redis.js'

const NARROW = 'secret-narrow'
const WIDE = 'secret-wide'
const ADMIN = 'admin-secret'

/** llm `m` and `other`, speech `whisper-1`, diffusion `sd`, one GPU each; keys `narrow` (m, whisper-1; one at a time) and `wide`. */
async function fleetOf (t: Test, options: Record<string, unknown> = {}): Promise<TestFleet> {
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1, 1],
    migrate: true,
    upstreams: [
      { model: 'm', gpus: [0] },
      { model: 'other', gpus: [1] },
      { model: 'whisper-1', kind: 'speech', gpus: [2] },
      { model: 'sd', kind: 'diffusor', gpus: [3] }
    ],
    options
  })
  await insertKey(fleet.db.query, 'narrow', NARROW, { models: '["m", "whisper-1"]', maxConcurrent: 1 })
  await insertKey(fleet.db.query, 'wide', WIDE)
  return fleet
}

interface Answer { status: number, body: any }

async function send (gw: Gateway, secret: string, path: string, body: BodyInit, headers: Record<string, string> = {}): Promise<Answer> {
  const res = await fetch(gw.url + path, { method: 'POST', headers: { authorization: `Bearer ${secret}`, ...headers }, body })
  const text = await res.text()
  let parsed: unknown
  try { parsed = JSON.parse(text) } catch { parsed = text }
  return { status: res.status, body: parsed }
}

const post = async (gw: Gateway, secret: string, path: string, body: unknown): Promise<Answer> =>
  await send(gw, secret, path, JSON.stringify(body), { 'content-type': 'application/json' })

const generate = { model: 'm', prompt: 'x', stream: false, options: { num_predict: 1 } }

async function leasedGpus (gw: Gateway): Promise<string[]> {
  const status = await (await fetch(gw.url + '/gpu/status')).json() as { gpus: Array<{ id: string, leased: boolean }> }
  return status.gpus.filter((g) => g.leased).map((g) => g.id)
}

const part = (name: string, value: string): string => `--XyZ\r\nContent-Disposition: form-data; name="${name}"\r\n\r\n${value}\r\n`
const filePart = (content: string): string => `--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n${content}\r\n`
const multipart = { 'content-type': 'multipart/form-data; boundary=XyZ' }

t.test('a key\'s models list holds on /gpu/reserve, /api/show, /upload and unloads: 403 as on the proxied routes, nothing reached', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await fleet.replica()
  const [, other, , sd] = fleet.upstreams

  const proxied = await post(gw, NARROW, '/api/generate', { ...generate, model: 'other' })
  t.equal(proxied.status, 403, 'the proxied route\'s answer for a model outside the list')

  const reserve = await post(gw, NARROW, '/gpu/reserve', { outputType: 'text', model: 'other' })
  t.equal(reserve.status, 403, '/gpu/reserve of a model outside the list')
  t.same(reserve.body, proxied.body, 'the same answer, in the same format')
  t.same(await leasedGpus(gw), [], 'no GPU reserved')
  t.same(await clientTokens(fleet.prefix, 'key:narrow'), { active: 0, waiting: 0 }, 'no slot held')

  const show = await post(gw, NARROW, '/api/show', { model: 'other' })
  t.equal(show.status, 403, '/api/show of a model outside the list')
  t.match(show.body, { error: /may not use model 'other'/ })
  t.equal(other.requests.filter((r) => r.path === '/api/show').length, 0, 'the other model\'s server was not asked')
  t.equal((await post(gw, NARROW, '/api/show', { model: 'm' })).status, 200, 'its own model\'s /api/show works')

  const unload = await post(gw, NARROW, '/api/generate', { model: 'other', keep_alive: 0 })
  t.equal(unload.status, 403, 'an unload of a model outside the list')

  const form = new FormData()
  form.append('file', new Blob(['png']), 'a.png')
  const upload = await send(gw, NARROW, '/upload', form)
  t.equal(upload.status, 403, '/upload to the servers of models outside the list')
  t.equal(upload.body.detail, upload.body.error, 'in the diffusion format')
  const named = await send(gw, NARROW, '/upload?model=sd', form)
  t.equal(named.status, 403, '/upload naming a model outside the list')
  t.equal(sd.uploads.size, 0, 'no file reached the diffusion server')
  const wide = await send(gw, WIDE, '/upload', form)
  t.equal(wide.status, 200, 'a key without a list uploads as before')

  const own = await post(gw, NARROW, '/gpu/reserve', { outputType: 'text', model: 'M' })
  t.equal(own.status, 200, 'its own model reserves (names compared as everywhere)')
  t.equal((await post(gw, NARROW, '/gpu/release', { leaseId: own.body.leaseId })).status, 200)
  await assertAllFree(t, gw)
})

t.test('a reservation holds its key\'s maxConcurrent slot until released or expired, and counts in its rpm', async (t) => {
  const fleet = await fleetOf(t, { LEASE_TTL_MS: 900 })
  await insertKey(fleet.db.query, 'once', 'secret-once', { rpm: 1 })
  const gw = await fleet.replica()

  const reserved = await post(gw, NARROW, '/gpu/reserve', { outputType: 'text', model: 'm' })
  t.equal(reserved.status, 200)
  t.same(await clientTokens(fleet.prefix, 'key:narrow'), { active: 1, waiting: 0 }, 'the reservation holds a slot')
  const over = await post(gw, NARROW, '/api/generate', generate)
  t.equal(over.status, 429, 'a request beside it is over maxConcurrent 1')
  t.match(over.body, { error: /maxConcurrent 1/ })
  const second = await post(gw, NARROW, '/gpu/reserve', { outputType: 'speech', model: 'whisper-1' })
  t.equal(second.status, 429, 'so is a second reservation')
  t.same(await leasedGpus(gw), [fleet.gpuIds[0]], 'the refused reservation took no GPU')

  // kept by its pings past the ttl: the slot with it
  for (let i = 0; i < 3; i++) {
    await new Promise((resolve) => setTimeout(resolve, 400))
    t.equal((await post(gw, NARROW, '/gpu/ping', { leaseId: reserved.body.leaseId })).status, 200, `ping ${i + 1}`)
  }
  t.same(await clientTokens(fleet.prefix, 'key:narrow'), { active: 1, waiting: 0 }, 'the slot lives as long as the pinged reservation')

  t.equal((await post(gw, NARROW, '/gpu/release', { leaseId: reserved.body.leaseId })).status, 200)
  t.same(await clientTokens(fleet.prefix, 'key:narrow'), { active: 0, waiting: 0 }, 'released: the slot is free')
  t.equal((await post(gw, NARROW, '/api/generate', generate)).status, 200, 'and a request runs')

  // not pinged: the slot ends with the reservation
  const forgotten = await post(gw, NARROW, '/gpu/reserve', { outputType: 'text', model: 'm' })
  t.equal(forgotten.status, 200)
  t.ok(await eventually(async () => (await leasedGpus(gw)).length === 0, 3000), 'the unpinged reservation expires')
  t.ok(await eventually(async () => (await clientTokens(fleet.prefix, 'key:narrow')).active === 0, 1000), 'and its slot with it')
  t.equal((await post(gw, NARROW, '/api/generate', generate)).status, 200, 'a request runs again')

  t.equal((await post(gw, 'secret-once', '/gpu/reserve', { outputType: 'text', model: 'other' })).status, 200, 'rpm 1: the first reservation')
  const rpm = await post(gw, 'secret-once', '/api/generate', generate)
  t.equal(rpm.status, 429, 'the reservation counted in the minute')
  t.match(rpm.body, { error: /rpm 1/ })
})

t.test('a reservation is its key\'s own: another key\'s ping and release answer as for an unknown lease; the admin token acts on any', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await fleet.replica()
  // a replica of the same fleet with the admin token (with it set, keys do not reserve at all)
  const admin = await fleet.replica({ ADMIN_TOKEN: ADMIN })
  const gpu = fleet.gpuIds[0]

  const reserved = await post(gw, NARROW, '/gpu/reserve', { outputType: 'text', model: 'm' })
  t.equal(reserved.status, 200)
  const leaseId = reserved.body.leaseId as string
  const unknown = await post(gw, WIDE, '/gpu/ping', { leaseId: 'no-such-lease' })
  t.equal(unknown.status, 404, 'an unknown lease id')

  for (const [path, body] of [['/gpu/ping', { leaseId }], ['/gpu/release', { leaseId }], ['/gpu/ping', { gpuIds: [gpu] }], ['/gpu/release', { gpuIds: [gpu] }]] as const) {
    const answer = await post(gw, WIDE, path, body)
    t.equal(answer.status, unknown.status, `another key's ${path} ${JSON.stringify(body)}: as for an unknown lease`)
    t.same(Object.keys(answer.body), ['error'])
  }
  t.same(await leasedGpus(gw), [gpu], 'the reservation is still there')
  t.same(await clientTokens(fleet.prefix, 'key:narrow'), { active: 1, waiting: 0 }, 'and so is its slot')

  t.equal((await post(gw, NARROW, '/gpu/ping', { gpuIds: [gpu] })).status, 200, 'its own key pings it by GPU id')
  t.equal((await post(gw, NARROW, '/gpu/release', { gpuIds: [gpu] })).status, 200, 'and releases it by GPU id')
  t.same(await clientTokens(fleet.prefix, 'key:narrow'), { active: 0, waiting: 0 }, 'its slot freed')
  await assertAllFree(t, gw)

  const byId = await post(gw, NARROW, '/gpu/reserve', { outputType: 'text', model: 'm' })
  t.equal((await post(admin, ADMIN, '/gpu/ping', { leaseId: byId.body.leaseId })).status, 200, 'the admin token pings a key\'s reservation')
  t.equal((await post(admin, ADMIN, '/gpu/release', { leaseId: byId.body.leaseId })).status, 200, 'and releases it by lease id')
  t.same(await clientTokens(fleet.prefix, 'key:narrow'), { active: 0, waiting: 0 }, 'its holder\'s slot freed')
  t.equal((await post(gw, NARROW, '/gpu/reserve', { outputType: 'text', model: 'm' })).status, 200)
  t.equal((await post(admin, ADMIN, '/gpu/release', { gpuIds: [gpu] })).status, 200, 'and by GPU id')
  t.same(await clientTokens(fleet.prefix, 'key:narrow'), { active: 0, waiting: 0 }, 'its holder\'s slot freed')
  await assertAllFree(t, gw)
})

t.test('a multipart model is checked as the server reads it: twice, or another than ?model=, is 400 and reaches no server', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await fleet.replica()
  const stt = fleet.upstreams[2] as SpeechSimulator
  const sd = fleet.upstreams[3]
  const transcriptions = (): number => stt.requests.filter((r) => r.path === '/v1/audio/transcriptions').length

  const cases: Array<[string, string, string]> = [
    ['another model in the field than ?model=', '?model=whisper-1', part('model', 'whisper-2') + filePart('abc') + '--XyZ--\r\n'],
    ['a second model field after the file', '', part('model', 'whisper-1') + filePart('abc') + part('model', 'whisper-2') + '--XyZ--\r\n'],
    ['?model= and a model field after the file naming another', '?model=whisper-1', filePart('abc') + part('model', 'whisper-2') + '--XyZ--\r\n'],
    ['the model field twice before the file', '', part('model', 'whisper-1') + part('model', 'whisper-1') + filePart('abc') + '--XyZ--\r\n']
  ]
  for (const [what, query, body] of cases) {
    const answer = await send(gw, NARROW, '/v1/audio/transcriptions' + query, body, multipart)
    t.equal(answer.status, 400, what)
    t.match(answer.body, { error: { type: 'invalid_request_error', message: /model/ } }, 'in OpenAI\'s envelope')
    await assertAllFree(t, gw)
  }
  t.equal(transcriptions(), 0, 'the speech server never received a whole body')
  t.same(await clientTokens(fleet.prefix, 'key:narrow'), { active: 0, waiting: 0 }, 'no slot held')

  const same = await send(gw, NARROW, '/v1/audio/transcriptions?model=whisper-1', filePart('abc') + part('model', 'Whisper-1') + '--XyZ--\r\n', multipart)
  t.equal(same.status, 200, 'a model field after the file naming the model of ?model= passes')
  const plain = await send(gw, NARROW, '/v1/audio/transcriptions', part('model', 'whisper-1') + filePart('abc') + part('language', 'en') + '--XyZ--\r\n', multipart)
  t.equal(plain.status, 200, 'one model field before the file passes')
  t.equal(transcriptions(), 2)

  const boundaries = await send(gw, NARROW, '/v1/audio/transcriptions', part('model', 'whisper-1') + filePart('abc') + '--XyZ--\r\n',
    { 'content-type': 'multipart/form-data; boundary=XyZ; boundary=other' })
  t.equal(boundaries.status, 400, 'two boundaries: a server could read other parts than the ones checked')
  t.equal(transcriptions(), 2)

  const twice = await send(gw, WIDE, '/upload', part('model', 'sd') + filePart('png') + part('model', 'sd') + '--XyZ--\r\n', multipart)
  t.equal(twice.status, 400, 'an upload with the model field twice')
  t.equal(twice.body.detail, twice.body.error, 'in the diffusion format')
  t.equal(sd.uploads.size, 0, 'no file kept by the diffusion server')
  await assertAllFree(t, gw)
})

const stores: Array<[string, (t: Test) => Promise<ClientLimitStore>]> = [
  ['memory', async () => new MemoryClientLimitStore()],
  ['redis', async (t) => new RedisClientLimitStore((await redisClients(t)).client, testPrefix(t))]
]

for (const [kind, make] of stores) {
  t.test(`${kind} store: a reservation's hold counts as in flight, names its holder, and ends when released or expired`, async (t) => {
    const store = await make(t)
    const limits = { maxConcurrent: 1 }
    await store.holdReservation('key:a', 'lease-1', 300)
    t.same(await store.reservationHolders(['lease-1', 'lease-2']), ['key:a', undefined], 'its holder, and nobody\'s for another token')
    t.match(await store.admit('key:a', 'r', limits, 30_000), { admitted: false, limit: 'maxConcurrent' }, 'it holds the slot')
    t.equal(await store.renewReservation('key:b', 'lease-1', 300), false, 'another client cannot renew it')
    t.equal(await store.renewReservation('key:a', 'lease-1', 300), true, 'its holder can')
    await store.releaseReservation('key:b', 'lease-1')
    t.same(await store.reservationHolders(['lease-1']), ['key:a'], 'nor release it')
    await store.releaseReservation('key:a', 'lease-1')
    t.same(await store.reservationHolders(['lease-1']), [undefined], 'released by its holder')
    t.equal(await store.renewReservation('key:a', 'lease-1', 300), false, 'a released hold is not renewed back')
    t.same(await store.admit('key:a', 'r', limits, 30_000), { admitted: true }, 'the slot is free')
    await store.release('key:a', 'r')

    await store.holdReservation('key:a', 'lease-3', 300)
    t.ok(await eventually(async () => (await store.reservationHolders(['lease-3']))[0] === undefined, 2000), 'not renewed, it expires')
    t.same(await store.admit('key:a', 'r', limits, 30_000), { admitted: true }, 'and frees its slot')
  })
}
