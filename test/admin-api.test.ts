// The admin API on MariaDB and Redis with two replicas (CONTRACT section 13): the token, every
// 400/404/409, a change used by the other replica within a second, drain/undrain with a stream
// running, and one transaction per change.
import t from 'tap'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { Ollama } from 'ollama'
import { startFleet, type Gateway } from './helpers/gateway.js'
import { startSimulator } from './helpers/upstream-simulator.js'
import { createTestDatabase } from './helpers/database.js'
import { databaseFleetStore } from '../services/fleet/fleet-store.js'
import mysql from 'mysql2/promise'

const TOKEN = 'admin-secret-for-tests'

interface Answer { status: number, body: any, headers: Headers }

async function call (gw: Gateway, method: string, path: string, body?: unknown, token: string | null = TOKEN): Promise<Answer> {
  const headers: Record<string, string> = {}
  if (token !== null) headers.authorization = `Bearer ${token}`
  if (body !== undefined) headers['content-type'] = 'application/json'
  const res = await fetch(gw.url + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) })
  const text = await res.text()
  return { status: res.status, body: text === '' ? undefined : JSON.parse(text), headers: res.headers }
}

async function generate (gw: Gateway, model: string, prompt = 'hi'): Promise<Answer> {
  const res = await fetch(`${gw.url}/api/generate`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model, prompt, stream: false })
  })
  const text = await res.text()
  return { status: res.status, body: JSON.parse(text), headers: res.headers }
}

/** Every admin route, for the 401 check. */
const ROUTES: Array<[string, string]> = [
  ['GET', '/admin/computers'], ['POST', '/admin/computers'], ['GET', '/admin/computers/1'], ['PATCH', '/admin/computers/1'], ['DELETE', '/admin/computers/1'],
  ['GET', '/admin/gpus'], ['POST', '/admin/gpus'], ['GET', '/admin/gpus/1'], ['PATCH', '/admin/gpus/1'], ['DELETE', '/admin/gpus/1'],
  ['GET', '/admin/models'], ['POST', '/admin/models'], ['DELETE', '/admin/models/llm/llama3'],
  ['GET', '/admin/assignments'], ['POST', '/admin/assignments'], ['GET', '/admin/assignments/1'], ['PATCH', '/admin/assignments/1'],
  ['DELETE', '/admin/assignments/1'], ['POST', '/admin/assignments/1/drain'], ['POST', '/admin/assignments/1/undrain']
]

t.test('admin API on MariaDB with two replicas', async t => {
  // GPU 1 (weight 2) is preferred for llama3 over GPU 2 (weight 1).
  const fleet = await startFleet(t, {
    gpus: [2, 1, 1],
    migrate: true,
    upstreams: [
      { model: 'llama3', gpus: [0], name: 'llama-a', simulator: { tokens: 80, tokenDelayMs: 25 } },
      { model: 'llama3', gpus: [1], name: 'llama-b' }
    ],
    options: { ADMIN_TOKEN: TOKEN }
  })
  const a = await fleet.replica()
  const b = await fleet.replica()
  const [gpuA, gpuB, gpuFree] = fleet.gpuIds.map(Number)

  t.test('401 without the token, or with a wrong one, on every route', async t => {
    for (const [method, path] of ROUTES) {
      const body = method === 'POST' || method === 'PATCH' ? { name: 'x' } : undefined
      t.equal((await call(a, method, path, body, null)).status, 401, `${method} ${path} without a token`)
      t.equal((await call(a, method, path, body, 'wrong')).status, 401, `${method} ${path} with a wrong token`)
    }
    t.equal((await call(a, 'GET', '/admin/computers', undefined, TOKEN)).status, 200, 'with the token')
  })

  t.test('computers', async t => {
    const list = await call(a, 'GET', '/admin/computers')
    t.same(list.body, [{ id: 1, name: 'box', ip: '127.0.0.1' }])
    const made = await call(a, 'POST', '/admin/computers', { name: 'gpu-box-2', ip: 'gpu-box-2.lan.example.org' })
    t.equal(made.status, 201)
    t.same(made.body, { id: 2, name: 'gpu-box-2', ip: 'gpu-box-2.lan.example.org' }, 'created with its id; a host name longer than the original 15 characters')
    t.same((await call(b, 'GET', '/admin/computers/2')).body, made.body, 'the other replica reads it')

    const cases: Array<[string, unknown, number, RegExp]> = [
      ['missing name', { ip: '10.0.0.1' }, 400, /^name: /],
      ['empty name', { name: '', ip: '10.0.0.1' }, 400, /^name: /],
      ['bad ip', { name: 'z', ip: 'http://x' }, 400, /^ip: must be an IPv4 or IPv6 address or a host name/],
      ['ip not a string', { name: 'z', ip: 10 }, 400, /^ip: /],
      ['unknown field', { name: 'z', ip: '10.0.0.1', ipAddr: 'x' }, 400, /ipAddr/],
      ['not an object', [1], 400, /body must be a JSON object/],
      ['duplicate name (case-insensitive, as the tables compare)', { name: 'GPU-BOX-2', ip: '10.0.0.1' }, 409, /already named "gpu-box-2"/]
    ]
    for (const [name, body, status, message] of cases) {
      const r = await call(a, 'POST', '/admin/computers', body)
      t.equal(r.status, status, name)
      t.match(r.body?.error, message, name)
    }
    t.equal((await call(a, 'GET', '/admin/computers/99')).status, 404)
    t.equal((await call(a, 'GET', '/admin/computers/no%20such')).status, 400, 'an id that cannot be one')
    t.equal((await call(a, 'PATCH', '/admin/computers/99', { name: 'q' })).status, 404)
    t.match((await call(a, 'PATCH', '/admin/computers/2', {})).body.error, /^request body must name at least one field/, 'an empty patch')
    t.equal((await call(a, 'PATCH', '/admin/computers/2', { name: 'box' })).status, 409, 'renamed onto another')
    const renamed = await call(a, 'PATCH', '/admin/computers/2', { ip: '10.1.2.3' })
    t.same(renamed.body, { id: 2, name: 'gpu-box-2', ip: '10.1.2.3' })
    const busy = await call(a, 'DELETE', '/admin/computers/1')
    t.equal(busy.status, 409, 'a computer with GPUs')
    t.match(busy.body.error, /still has GPUs/)
    t.equal((await call(a, 'DELETE', '/admin/computers/99')).status, 404)
    t.equal((await call(a, 'DELETE', '/admin/computers/2')).status, 204)
    t.equal((await call(b, 'GET', '/admin/computers/2')).status, 404, 'gone for the other replica too')
    const rows = await fleet.db.query('SELECT id FROM computers ORDER BY id')
    t.same(rows.map((r) => r.id), [1], 'the table holds what the API says')
  })

  t.test('gpus', async t => {
    const bad: Array<[string, unknown, RegExp]> = [
      ['unknown computer', { name: 'g', vramGb: 8, computerId: 42 }, /^computerId: no computer 42/],
      ['negative vram', { name: 'g', vramGb: -1, computerId: 1 }, /^vramGb: /],
      ['vram as a string (never coerced)', { name: 'g', vramGb: '8', computerId: 1 }, /^vramGb: /],
      ['weight not a number', { name: 'g', vramGb: 8, computerId: 1, weight: 'heavy' }, /^weight: /],
      ['computerId a fraction', { name: 'g', vramGb: 8, computerId: 1.5 }, /^computerId: /]
    ]
    for (const [name, body, message] of bad) {
      const r = await call(a, 'POST', '/admin/gpus', body)
      t.equal(r.status, 400, name)
      t.match(r.body.error, message, name)
    }
    const made = await call(a, 'POST', '/admin/gpus', { name: 'RTX 4090', vramGb: 24.5, computerId: 1, weight: 3 })
    t.equal(made.status, 201)
    t.same(made.body, { id: 4, name: 'RTX 4090', vramGb: 24.5, computerId: 1, weight: 3 })
    t.equal((await call(a, 'POST', '/admin/gpus', { name: 'rtx 4090', vramGb: 8, computerId: 1 })).status, 409, 'the same name on the same computer')
    t.same((await call(a, 'PATCH', '/admin/gpus/4', { weight: null })).body.weight, null)
    const inUse = await call(a, 'DELETE', `/admin/gpus/${gpuA}`)
    t.equal(inUse.status, 409, 'a GPU still in an assignment')
    t.match(inUse.body.error, /still in assignment/)
    t.equal((await call(a, 'PATCH', '/admin/gpus/99', { weight: 1 })).status, 404)
    t.equal((await call(a, 'DELETE', '/admin/gpus/4')).status, 204)
    t.equal((await call(b, 'GET', '/admin/gpus/4')).status, 404)
  })

  t.test('models', async t => {
    const list = (await call(a, 'GET', '/admin/models')).body
    t.same(list, [{ kind: 'llm', name: 'llama3', size: 0 }])
    t.equal((await call(a, 'POST', '/admin/models', { kind: 'image', name: 'x' })).status, 400, 'bad kind')
    t.match((await call(a, 'POST', '/admin/models', { kind: 'llm' })).body.error, /^name: /)
    const dup = await call(a, 'POST', '/admin/models', { kind: 'diffusor', name: 'LLAMA3:latest' })
    t.equal(dup.status, 409, 'a model listed already, in another spelling and kind')
    const made = await call(a, 'POST', '/admin/models', { kind: 'speech', name: 'whisper-1' })
    t.equal(made.status, 201)
    t.same(made.body, { kind: 'speech', name: 'whisper-1' })
    t.equal((await call(a, 'DELETE', '/admin/models/llm/whisper-1')).status, 404, 'not under that kind')
    t.equal((await call(a, 'DELETE', '/admin/models/speech/whisper-1')).status, 204)
    const used = await call(a, 'DELETE', '/admin/models/llm/llama3')
    t.equal(used.status, 409, 'a model an assignment serves')
    t.match(used.body.error, /still served by assignment/)
  })

  t.test('a new assignment is served by the other replica within a second', async t => {
    const sim = await startSimulator({ gpuIds: [String(gpuFree)], models: ['phi3'] })
    t.teardown(() => sim.close())
    t.equal((await generate(b, 'phi3')).status, 404, 'not there yet')
    t.equal((await call(a, 'POST', '/admin/models', { kind: 'llm', name: 'phi3' })).status, 201)

    const bad: Array<[string, unknown, number, RegExp]> = [
      ['unknown gpu', { name: 'phi', model: 'phi3', port: sim.port, gpuIds: [99] }, 400, /^gpuIds\[0\]: no gpu 99/],
      ['no gpus', { name: 'phi', model: 'phi3', port: sim.port, gpuIds: [] }, 400, /^gpuIds/],
      ['a gpu twice', { name: 'phi', model: 'phi3', port: sim.port, gpuIds: [gpuFree, String(gpuFree)] }, 400, /^gpuIds\[1\]: names gpu .* twice/],
      ['port out of range', { name: 'phi', model: 'phi3', port: 70000, gpuIds: [gpuFree] }, 400, /^port: /],
      ['maxParallel 0', { name: 'phi', model: 'phi3', port: sim.port, gpuIds: [gpuFree], maxParallel: 0 }, 400, /^maxParallel: /],
      ['unlisted model', { name: 'phi', model: 'mistral', port: sim.port, gpuIds: [gpuFree] }, 400, /^model: "mistral" is not listed/],
      ['kind contradicting the tables', { name: 'phi', model: 'phi3', kind: 'diffusor', port: sim.port, gpuIds: [gpuFree] }, 400, /^kind: /],
      ['duplicate name', { name: 'LLAMA-A', model: 'phi3', port: sim.port, gpuIds: [gpuFree] }, 409, /already named "llama-a"/]
    ]
    for (const [name, body, status, message] of bad) {
      const r = await call(a, 'POST', '/admin/assignments', body)
      t.equal(r.status, status, name)
      t.match(r.body.error, message, name)
    }
    t.same((await fleet.db.query('SELECT COUNT(*) AS n FROM assignments'))[0].n, 2, 'no refused assignment was written')

    const made = await call(a, 'POST', '/admin/assignments', { name: 'phi', model: 'phi3', port: sim.port, gpuIds: [gpuFree], maxParallel: 2 })
    t.equal(made.status, 201)
    const createdAt = performance.now()
    t.same(made.body, { id: 3, name: 'phi', model: 'phi3', kind: 'llm', port: sim.port, gpuIds: [gpuFree], maxParallel: 2, drained: false })
    let served: Answer
    let sentAt: number
    for (;;) {
      // (when the request that succeeded was sent: what the replica knew then)
      sentAt = performance.now()
      served = await generate(b, 'phi3')
      if (served.status === 200 || performance.now() - createdAt > 3000) break
      await sleep(10)
    }
    const ms = sentAt - createdAt
    t.equal(served.status, 200, 'the other replica serves the new assignment')
    t.equal(served.headers.get('x-maestro-assignment'), 'phi')
    t.ok(ms < 1000, `within a second (took ${ms.toFixed(0)} ms)`)
    t.equal(sim.requests.filter((r) => r.path === '/api/generate').length, 1, 'the new server answered it')
    t.same((await fleet.db.query('SELECT assignment_id, gpu_id FROM assignment_gpus WHERE assignment_id = 3')).map((r) => r.gpu_id), [gpuFree])
    t.same((await fleet.db.query('SELECT max_parallel FROM assignments WHERE id = 3'))[0].max_parallel, 2)

    t.equal((await call(a, 'PATCH', '/admin/assignments/99', { port: 1 })).status, 404)
    t.equal((await call(a, 'PATCH', '/admin/assignments/3', { name: 'llama-b' })).status, 409, 'renamed onto another')
    t.equal((await call(a, 'DELETE', '/admin/assignments/3')).status, 204)
    t.equal((await call(a, 'DELETE', '/admin/assignments/3')).status, 404)
    t.same(await fleet.db.query('SELECT * FROM assignment_gpus WHERE assignment_id = 3'), [], 'its GPU links went with it')
    const start = performance.now()
    let goneAt = start
    while ((await generate(b, 'phi3')).status !== 404 && performance.now() - start < 3000) {
      await sleep(10)
      goneAt = performance.now()
    }
    t.ok(goneAt - start < 1000, `the other replica stops using it within a second (${(goneAt - start).toFixed(0)} ms)`)
  })

  t.test('a drained assignment takes no new request; its running stream finishes', async t => {
    const ollama = new Ollama({ host: a.url })
    // llama-a (GPU 1, weight 2) is preferred; its stream runs ~2 s (time for the admin calls below on a busy machine).
    const parts: any[] = []
    const stream = (async () => {
      for await (const part of await ollama.generate({ model: 'llama3', prompt: 'long', stream: true })) parts.push(part)
    })()
    const deadline = performance.now() + 2000
    // its first line out: it runs on llama-a (the model loads before the first token)
    while (parts.length === 0 && performance.now() < deadline) await sleep(5)
    t.ok((await fleet.heldGpus()).includes(String(gpuA)), 'the stream holds llama-a')

    const busy = await call(b, 'DELETE', '/admin/assignments/1')
    t.equal(busy.status, 409, 'an assignment with a request in flight is not deleted')
    t.match(busy.body.error, /1 request in flight: drain it first/)
    t.equal((await call(b, 'PATCH', '/admin/assignments/1', { port: 1 })).status, 409, 'nor moved')
    t.same((await call(b, 'PATCH', '/admin/assignments/1', { maxParallel: 1 })).status, 200, 'a change that does not move it is fine')

    const drained = await call(b, 'POST', '/admin/assignments/1/drain')
    t.equal(drained.status, 200)
    t.equal(drained.body.drained, true)
    t.same((await fleet.db.query('SELECT assignment_id FROM maestro_assignment_drains')).map((r) => r.assignment_id), [1], 'kept in the gateway\'s own table')
    t.ok(parts.length > 0 && parts.at(-1).done !== true, 'the stream is still running')
    await stream
    t.equal(parts.at(-1)?.done, true, 'the running stream finished')
    t.equal(parts.length, 81)

    // llama-a is free and preferred, but drained: every new request goes to llama-b.
    for (const gw of [a, b, a, b]) {
      const r = await generate(gw, 'llama3')
      t.equal(r.status, 200)
      t.equal(r.headers.get('x-maestro-assignment'), 'llama-b', 'not the drained one')
    }
    // drained through replica a, asked of replica b: used there within a second
    t.equal((await call(a, 'POST', '/admin/assignments/2/drain')).status, 200)
    const drainedAt = performance.now()
    let askedAt = drainedAt
    let none = await generate(b, 'llama3')
    while (none.status === 200 && performance.now() - drainedAt < 3000) {
      askedAt = performance.now()
      none = await generate(b, 'llama3')
    }
    t.ok(askedAt - drainedAt < 1000, `the other replica stops using it within a second (${(askedAt - drainedAt).toFixed(0)} ms)`)
    t.equal(none.status, 503, 'every server of the model drained')
    t.match(none.body.error, /drained/)
    t.ok(none.headers.get('retry-after') != null)

    t.equal((await call(a, 'POST', '/admin/assignments/1/undrain')).status, 200)
    t.equal((await call(a, 'POST', '/admin/assignments/2/undrain')).status, 200)
    t.equal((await call(a, 'POST', '/admin/assignments/99/drain')).status, 404)
    const undrainedAt = performance.now()
    // Two at once: one may take llama-b (warm, it served the last requests: the scheduler's warm
    // preference may pick it over llama-a's weight), the other finds llama-b busy and must take
    // llama-a at once if replica b knows it is undrained (else it waits for llama-b).
    let sentAt = undrainedAt
    let servedBy: Array<string | null> = []
    while (!servedBy.includes('llama-a') && performance.now() - undrainedAt < 3000) {
      sentAt = performance.now()
      servedBy = (await Promise.all([generate(b, 'llama3'), generate(b, 'llama3')])).map((r) => r.headers.get('x-maestro-assignment'))
    }
    t.ok(servedBy.includes('llama-a'), `undrained: llama-a takes requests again (${servedBy.join(', ')})`)
    // (llama-a's answer itself takes ~2 s: what counts is when the requests that reached it were sent)
    t.ok(sentAt - undrainedAt < 1000, `within a second on the other replica (${(sentAt - undrainedAt).toFixed(0)} ms)`)
    t.same(await fleet.db.query('SELECT * FROM maestro_assignment_drains'), [])
  })
})

t.test('a change is one transaction: a statement refused half-way leaves nothing behind', async t => {
  const db = await createTestDatabase(t, { migrate: true })
  const connection = await mysql.createConnection(db.url)
  t.teardown(async () => { await connection.end() })
  const store = databaseFleetStore({
    query: db.query,
    transaction: async (work) => {
      const conn = await db.pool.getConnection()
      try {
        await conn.beginTransaction()
        const out = await work(async (sql, params) => (await conn.query(sql, params))[0] as any[])
        await conn.commit()
        return out
      } catch (err) {
        await conn.rollback()
        throw err
      } finally {
        conn.release()
      }
    }
  })
  // The computer's INSERT runs first and succeeds; the GPU's names a computer that does not exist.
  await t.rejects(store.change((f) => {
    f.computers.push({ id: 7, name: 'fine', ip: '10.0.0.7' })
    f.gpus.push({ id: 8, name: 'orphan', vramGb: 1, computerId: 999, weight: null })
  }), { statusCode: 409 } as any)
  const [rows] = await connection.query('SELECT COUNT(*) AS n FROM computers')
  t.equal((rows as any)[0].n, 0, 'the computer inserted before the refusal was rolled back')
})

t.test('an unmigrated database: drain and maxParallel ask for the migration', async t => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'llama3', gpus: [0] }], options: { ADMIN_TOKEN: TOKEN } })
  const gw = await fleet.replica()
  const drain = await call(gw, 'POST', '/admin/assignments/1/drain')
  t.equal(drain.status, 409)
  t.match(drain.body.error, /npm run migrate/)
  t.equal((await call(gw, 'PATCH', '/admin/assignments/1', { maxParallel: 3 })).status, 409)
  const longIp = await call(gw, 'POST', '/admin/computers', { name: 'far', ip: 'far-away-host.example.org' })
  t.equal(longIp.status, 400, 'a host name the original VARCHAR(15) cannot hold')
  t.match(longIp.body.error, /^ip: .*npm run migrate/)
  t.same((await call(gw, 'GET', '/admin/assignments/1')).body.maxParallel, 1, 'reads as 1 without the column')
  t.equal((await generate(gw, 'llama3')).status, 200, 'and the gateway serves on as before')
})

t.test('a request already waiting when its candidate is drained is not given the drained server', async t => {
  // llama-x (preferred) answers in ~1 s, llama-y in ~2.5 s: time for the drain to reach every
  // replica before llama-x frees, even on a busy machine.
  const fleet = await startFleet(t, {
    gpus: [2, 1],
    migrate: true,
    upstreams: [
      { model: 'llama3', gpus: [0], name: 'llama-x', simulator: { tokens: 40, tokenDelayMs: 25 } },
      { model: 'llama3', gpus: [1], name: 'llama-y', simulator: { tokens: 100, tokenDelayMs: 25 } }
    ],
    options: { ADMIN_TOKEN: TOKEN }
  })
  const a = await fleet.replica()
  const b = await fleet.replica()
  const deadline = performance.now() + 2000
  const busyX = generate(a, 'llama3', 'first')
  while ((await fleet.heldGpus()).length < 1 && performance.now() < deadline) await sleep(5)
  const busyY = generate(a, 'llama3', 'second')
  while ((await fleet.heldGpus()).length < 2 && performance.now() < deadline) await sleep(5)
  t.equal((await fleet.heldGpus()).length, 2, 'both servers busy')
  const waiter = generate(b, 'llama3', 'waiting')
  await sleep(50)
  const status = await (await fetch(`${a.url}/gpu/status`)).json() as { waiting: Array<{ depth: number }> }
  t.same(status.waiting.map((w) => w.depth), [1], 'one request waiting for either server')
  t.equal((await call(a, 'POST', '/admin/assignments/1/drain')).status, 200, 'llama-x drained while it waits')
  t.equal((await busyX).headers.get('x-maestro-assignment'), 'llama-x', 'llama-x frees first')
  const served = await waiter
  t.equal(served.status, 200)
  t.equal(served.headers.get('x-maestro-assignment'), 'llama-y', 'the waiter is served by the server still taking work')
  t.equal((await busyY).status, 200)
  t.same(fleet.upstreams[0].requests.filter((r) => r.path === '/api/generate').map((r) => r.body.prompt), ['first'], 'llama-x got no new request')
})
