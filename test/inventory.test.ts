import t from 'tap'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import {
  Inventory,
  loadInventoryFromDatabase,
  loadInventoryFromFile,
  parseInventoryFile,
  type Query
} from '../services/fleet/inventory.js'
import { migrate } from '../services/fleet/migrations.js'
import { createTestDatabase, seedInventory } from './helpers/database.js'

const ids = (list: Array<{ id: string }>): string[] => list.map(a => a.id)

t.test('database: preference order, names, kinds', async t => {
  const db = await createTestDatabase(t)
  await seedInventory(db.query, {
    computers: [{ name: 'box-a', ip: '10.0.0.1' }, { name: 'box-b', ip: '10.0.0.2' }],
    gpus: [
      { name: 'a0', computer: 'box-a', weight: 1 }, // 1
      { name: 'a1', computer: 0, weight: null }, // 2
      { name: 'b0', computer: 'box-b', weight: 0.5 }, // 3
      { name: 'b1', computer: 1, weight: 2 }, // 4
      { name: 'b2', computer: 1 }, // 5, weight NULL
      { id: 10, name: 'a2', computer: 0, weight: 3, vram: 48 } // 10
    ],
    llms: ['m-small', 'llama3', 'llama3:8b'],
    diffusors: ['sd'],
    speech: ['whisper'],
    assignments: [
      { name: 'a1', model: 'm-small', port: 11434, gpus: [1, 2] }, // 1: weight 0.5
      { name: 'a2', model: 'm-small', port: 11434, gpus: [3] }, // 2: weight 0.5
      { name: 'a3', model: 'M-Small:latest', port: 11435, gpus: [4] }, // 3: weight 2
      { name: 'a4', model: 'm-small', port: 11436, gpus: [5] }, // 4: weight NULL -> 0
      { name: 'a5', model: 'llama3', port: 11437, gpus: [10, 1] }, // 5
      { name: 'a6', model: 'llama3:8b', port: 11438, gpus: [3] }, // 6
      { name: 'sd1', model: 'sd', port: 8000, gpus: [4, 5] }, // 7
      { name: 'orphan', model: 'not-listed', port: 11439, gpus: [1] }, // 8
      { name: 'nogpu', model: 'm-small', port: 11440, gpus: [] }, // 9
      { name: 'talk', model: 'whisper', port: 9000, gpus: [2] } // 10
    ]
  })
  const snapshot = await loadInventoryFromDatabase(db.query)
  const inv = new Inventory(snapshot)

  t.same(ids(inv.candidates('m-small', 'llm')), ['3', '1', '2', '4'], 'highest average weight first, NULL as 0, ties by lowest id')
  t.same(ids(inv.candidates('M-Small:latest', 'llm')), ['3', '1', '2', '4'], 'M-Small:latest ≡ m-small')
  t.same(ids(inv.candidates('M-SMALL', 'llm')), ['3', '1', '2', '4'])
  t.same(ids(inv.candidates('m-small', 'diffusor')), [], 'an llm is not a diffusor')
  t.same(ids(inv.candidates('llama3', 'llm')), ['5'])
  t.same(ids(inv.candidates('llama3:latest', 'llm')), ['5'])
  t.same(ids(inv.candidates('llama3:8b', 'llm')), ['6'], 'llama3:8b ≠ llama3')
  t.same(ids(inv.candidates('LLAMA3:8B', 'llm')), ['6'])
  t.same(ids(inv.candidates('sd', 'diffusor')), ['7'])
  t.same(ids(inv.candidates('sd', 'llm')), [])
  t.same(ids(inv.candidates('whisper', 'speech')), ['10'])
  t.same(ids(inv.candidates('not-listed', 'llm')), [], 'a model in no table has no candidates')
  t.same(ids(inv.candidates('nope', 'llm')), [], 'no wildcard in this database')
  t.same(ids(inv.candidates('', 'llm')), [])

  t.equal(inv.kindOf('m-small'), 'llm')
  t.equal(inv.kindOf('M-SMALL:latest'), 'llm')
  t.equal(inv.kindOf('SD'), 'diffusor')
  t.equal(inv.kindOf('whisper'), 'speech')
  t.equal(inv.kindOf('llama3:70b'), undefined)
  t.same(inv.modelNames('llm'), ['llama3', 'llama3:8b', 'm-small'])
  t.same(inv.modelNames('diffusor'), ['sd'])
  t.same(inv.modelNames('speech'), ['whisper'])

  t.same(ids(snapshot.assignments), ['1', '2', '3', '4', '5', '6', '7', '10'], 'unusable assignments left out')
  t.match(snapshot.warnings.join('\n'), /assignment 8 "orphan" serves model "not-listed", which is in none of llms, diffusors, speech_models/)
  t.match(snapshot.warnings.join('\n'), /assignment 9 "nogpu" has no GPUs/)
  t.equal(snapshot.warnings.length, 2)

  t.same(inv.assignment('5'), {
    id: '5',
    name: 'a5',
    model: 'llama3',
    modelKey: 'llama3',
    kind: 'llm',
    ip: '10.0.0.1',
    port: 11437,
    url: 'http://10.0.0.1:11437',
    host: '10.0.0.1:11437',
    gpuIds: ['1', '10'],
    weight: 2,
    computerName: 'box-a',
    capacity: 1
  }, 'gpu ids sorted numerically, weight = average; capacity 1 without max_parallel')
  t.equal(inv.assignment('3')?.model, 'M-Small:latest', 'model as stored')
  t.equal(inv.assignment('3')?.modelKey, 'm-small')
  t.equal(inv.assignment('7')?.weight, 1, '(2 + NULL) / 2')
  t.equal(inv.assignment('1')?.weight, 0.5)
  t.equal(inv.assignment('8'), undefined)
  t.same(ids(inv.assignmentsOfKind('llm')), ['3', '5', '1', '2', '6', '4'], 'weights 2, 2, 0.5, 0.5, 0.5, 0')
  t.same(ids(inv.assignmentsOfKind('diffusor')), ['7'])
  t.same(inv.gpu('10'), { id: '10', name: 'a2', vramSize: 48, weight: 3, computerId: '1', computerName: 'box-a', ip: '10.0.0.1' })
  t.same(inv.gpu('5')?.weight, null)
  t.equal(inv.gpu('99'), undefined)
  t.same(ids(snapshot.gpus), ['1', '2', '3', '4', '5', '10'])

  t.same(new Inventory(JSON.parse(JSON.stringify(snapshot))).candidates('m-small', 'llm'), inv.candidates('m-small', 'llm'),
    'a snapshot survives JSON (as in a cache)')
  const c = inv.candidates('m-small', 'llm')
  c.pop()
  t.equal(inv.candidates('m-small', 'llm').length, 4, 'callers get their own array')
})

t.test('database: odd model names are data, matched exactly', async t => {
  const db = await createTestDatabase(t)
  const odd = [
    "it's",
    'say "hi"',
    'a_b', 'axb',
    '50%', '50%off',
    'star*', 'q?',
    'two\nlines',
    'back\\slash',
    "x'; DROP TABLE assignments; --",
    'ünï/cödé:7b'
  ]
  await seedInventory(db.query, {
    gpus: [{ weight: 1 }],
    llms: odd,
    assignments: odd.map((model, i) => ({ name: `odd-${i}`, model, port: 20000 + i, gpus: [1] }))
  })
  const statements: Array<{ sql: string, params?: unknown[] }> = []
  const recording: Query = async (sql, params) => {
    statements.push({ sql, params })
    return await db.query(sql, params)
  }
  const inv = new Inventory(await loadInventoryFromDatabase(recording))
  t.same(inv.snapshot.warnings, [])
  for (const [i, model] of odd.entries()) {
    t.same(ids(inv.candidates(model, 'llm')), [String(i + 1)], `${JSON.stringify(model)} finds exactly its own assignment`)
    t.equal(inv.kindOf(model), 'llm')
  }
  t.same(ids(inv.candidates('a%b', 'llm')), [], 'no LIKE semantics')
  t.same(ids(inv.candidates('a.b', 'llm')), [], 'no pattern semantics')
  t.same(ids(inv.candidates('star', 'llm')), [])
  t.same(ids(inv.candidates('q', 'llm')), [])
  t.same(ids(inv.candidates('two', 'llm')), [])
  t.same(ids(inv.candidates('*', 'llm')), [])
  t.same([...inv.modelNames('llm')].sort(), [...odd].sort())
  for (const s of statements) {
    t.same(s.params ?? [], [], 'fixed SQL, no parameters')
    for (const model of odd) t.notOk(s.sql.includes(model), 'no model name in SQL')
  }
  const [{ n }] = await db.query('SELECT COUNT(*) AS n FROM assignments')
  t.equal(Number(n), odd.length, 'tables intact')
})

t.test('database: addresses, wildcard rows, GPUs on two computers', async t => {
  const db = await createTestDatabase(t, { migrate: true })
  await seedInventory(db.query, {
    computers: [
      { name: 'v6', ip: 'fd00::1' },
      { name: 'named', ip: 'gpu-box.internal' },
      { name: 'bad', ip: 'http://x/' }
    ],
    gpus: [{ computer: 0 }, { computer: 1 }, { computer: 2 }, { computer: 0 }],
    llms: ['*', 'm'],
    diffusors: ['sd'],
    assignments: [
      { name: 'six', model: 'm', port: 11434, gpus: [1] },
      { name: 'host', model: '*', port: 11434, gpus: [2] },
      { name: 'broken', model: 'm', port: 11434, gpus: [3] },
      { name: 'split', model: 'sd', port: 8000, gpus: [4, 2] }
    ]
  })
  const inv = new Inventory(await loadInventoryFromDatabase(db.query))
  const six = inv.assignment('1')
  t.equal(six?.url, 'http://[fd00::1]:11434')
  t.equal(six?.host, '[fd00::1]:11434')
  t.equal(six?.ip, 'fd00::1')
  t.equal(inv.assignment('2')?.url, 'http://gpu-box.internal:11434')
  t.equal(inv.assignment('3'), undefined, 'unusable address: left out')
  t.match(inv.snapshot.warnings.join('\n'), /computer 3 "bad" has an unusable address/)
  t.equal(inv.assignment('4')?.ip, 'gpu-box.internal', 'GPUs on two computers: the computer of the lowest GPU id')
  t.same(inv.assignment('4')?.gpuIds, ['2', '4'])
  t.match(inv.snapshot.warnings.join('\n'), /assignment 4 "split" has GPUs on several computers/)
  t.same(ids(inv.candidates('m', 'llm')), ['1'], 'a named model is not served by the wildcard')
  t.same(ids(inv.candidates('anything', 'llm')), ['2'], "'*' listed in llms: a wildcard llm assignment")
  t.same(ids(inv.candidates('sd', 'llm')), [], 'a diffusor is not an llm')
  t.same(inv.modelNames('llm'), ['m'])
})

t.test('capacity: assignments.max_parallel (after migrate), NULL or < 1 meaning 1; a file\'s "parallel"', async t => {
  const db = await createTestDatabase(t)
  await seedInventory(db.query, {
    computers: [{ name: 'box', ip: '10.0.0.1' }],
    gpus: [{ name: 'g', computer: 'box' }],
    llms: ['m'],
    assignments: [
      { name: 'four', model: 'm', port: 1, gpus: [1] },
      { name: 'null', model: 'm', port: 2, gpus: [1] },
      { name: 'zero', model: 'm', port: 3, gpus: [1] },
      { name: 'minus', model: 'm', port: 4, gpus: [1] }
    ]
  })
  await migrate(db.query)
  await db.query("UPDATE assignments SET max_parallel = CASE name WHEN 'four' THEN 4 WHEN 'zero' THEN 0 WHEN 'minus' THEN -3 ELSE NULL END")
  const inv = new Inventory(await loadInventoryFromDatabase(db.query))
  t.same(inv.snapshot.assignments.map(a => [a.name, a.capacity]), [['four', 4], ['null', 1], ['zero', 1], ['minus', 1]])

  const file = (parallel: unknown): unknown => ({
    computers: [{ id: 1, name: 'box', ip: '10.0.0.1' }],
    gpus: [{ id: 1, computer: 1 }],
    assignments: [{ id: 1, name: 'a', model: 'm', kind: 'llm', port: 1, gpus: [1], parallel }]
  })
  t.equal(parseInventoryFile(file(4), 'f.json').assignments[0].capacity, 4)
  t.equal(parseInventoryFile(file(undefined), 'f.json').assignments[0].capacity, 1, 'absent: 1')
  for (const bad of [0, 1.5, '4', -1]) {
    t.throws(() => parseInventoryFile(file(bad), 'f.json'), /assignments\[0\]\.parallel must be a whole number of at least 1/)
  }
})

t.test('database down: the test fails, it is not skipped', async t => {
  const saved = process.env.MARIADB_URL
  process.env.MARIADB_URL = 'mysql://root@127.0.0.1:1'
  t.teardown(() => {
    if (saved === undefined) delete process.env.MARIADB_URL
    else process.env.MARIADB_URL = saved
  })
  await t.rejects(createTestDatabase({ teardown () {} }), /tests need a MariaDB: cannot connect to mysql:\/\/root@127\.0\.0\.1:1/)
})

/* ------------------------------------------------------------------------------------------ */

const example = {
  computers: [{ id: 1, name: 'box', ip: '127.0.0.1' }, { id: 'v6', name: 'six', ip: '::1' }],
  gpus: [
    { id: 1, name: 'RTX 4090', vram: 24, computer: 1, weight: 1 },
    { id: 2, name: 'RTX 3090', vram: 24, computer: 1 },
    { id: 3, computer: 'v6', weight: 5 }
  ],
  models: { llms: ['llama3', 'special'], diffusors: ['sdxl-turbo'], speech: [] },
  assignments: [
    { id: 1, name: 'ollama-any', model: '*', kind: 'llm', port: 11434, gpus: [1] },
    { id: 2, name: 'ollama-special', model: 'Special:latest', port: 11435, gpus: [2, 1] },
    { id: 3, name: 'sd', model: 'sdxl-turbo', port: 8000, gpus: [2] },
    { id: 4, name: 'embedder', model: 'nomic-embed-text', kind: 'llm', port: 11436, gpus: [3] }
  ]
}
const clone = (): any => JSON.parse(JSON.stringify(example))

t.test('file: wildcard and kinds', async t => {
  const snapshot = parseInventoryFile(clone(), 'test.json')
  const inv = new Inventory(snapshot)
  t.same(snapshot.warnings, [])
  t.same(ids(inv.candidates('whatever', 'llm')), ['1'], "'*' serves a model nobody names")
  t.same(ids(inv.candidates('llama3', 'llm')), ['1'], "'*' serves a listed llm nobody names")
  t.same(ids(inv.candidates('special', 'llm')), ['2'], 'a named model is served by its own assignments only')
  t.same(ids(inv.candidates('SPECIAL', 'llm')), ['2'])
  t.same(ids(inv.candidates('nomic-embed-text', 'llm')), ['4'])
  t.same(ids(inv.candidates('sdxl-turbo', 'diffusor')), ['3'])
  t.same(ids(inv.candidates('sdxl-turbo', 'llm')), [], 'a known diffusor is not served by the llm wildcard')
  t.same(ids(inv.candidates('whatever', 'diffusor')), [], 'no diffusor wildcard')
  t.same(ids(inv.candidates('*', 'llm')), [], "'*' is not a model")
  t.equal(inv.kindOf('nomic-embed-text:latest'), 'llm', 'an explicit kind makes the model known')
  t.equal(inv.kindOf('whatever'), undefined)
  t.same(inv.modelNames('llm'), ['special', 'nomic-embed-text'])
  t.same(inv.modelNames('diffusor'), ['sdxl-turbo'])
  t.same(inv.assignment('1'), {
    id: '1',
    name: 'ollama-any',
    model: '*',
    modelKey: '*',
    kind: 'llm',
    ip: '127.0.0.1',
    port: 11434,
    url: 'http://127.0.0.1:11434',
    host: '127.0.0.1:11434',
    gpuIds: ['1'],
    weight: 1,
    computerName: 'box',
    capacity: 1
  })
  t.same(inv.assignment('2')?.gpuIds, ['1', '2'])
  t.equal(inv.assignment('2')?.weight, 0.5)
  t.equal(inv.assignment('4')?.url, 'http://[::1]:11436')
  t.same(inv.gpu('2'), { id: '2', name: 'RTX 3090', vramSize: 24, weight: null, computerId: '1', computerName: 'box', ip: '127.0.0.1' })
  t.equal(inv.gpu('3')?.name, 'GPU 3', 'default name')

  const minimal = parseInventoryFile({
    computers: [{ id: 1, name: 'local', ip: '127.0.0.1' }],
    gpus: [{ id: 1, computer: 1 }],
    assignments: [{ id: 1, name: 'ollama', model: '*', kind: 'llm', port: 11434, gpus: [1] }],
    _comment: 'comments are fields starting with _'
  }, 'minimal')
  t.same(ids(new Inventory(minimal).candidates('llama3.2', 'llm')), ['1'], 'models may be omitted')
})

t.test('file: capacity, drained assignments and API keys (schemas shared with the admin API)', async t => {
  const f = clone()
  f.assignments[1].parallel = 4
  f.assignments[1].drained = true
  f.assignments[1]._note = 'comments are allowed in entries too'
  f.apiKeys = [{ name: 'ci', sha256: 'ab'.repeat(32), priority: 'low', maxConcurrent: 2, maxQueued: 1, rpm: 60, createdAt: '2026-12-01T09:00:00.000Z', models: ['llama3'] }]
  const inv = new Inventory(parseInventoryFile(f, 'x'))
  t.same(ids(inv.candidates('special', 'llm')), [], 'a drained assignment is no candidate')
  t.same(ids(inv.candidates('special', 'llm', { drained: true })), ['2'], 'unless asked for')
  t.equal(inv.assignment('2')?.drained, true, 'still known (its leases in flight have a name)')
  t.equal(inv.assignment('1')?.drained, undefined)
})

t.test('file: validation errors name the source and the field', async t => {
  const cases: Array<[string, (f: any) => unknown, RegExp]> = [
    ['not an object', () => [], /^inventory src\.json: the inventory must be an object \(got an array\)$/],
    ['unknown top-level field', f => { f.gpu = [] }, /the inventory has unknown field "gpu"/],
    ['missing computers', f => { delete f.computers }, /computers must be an array \(got nothing\)/],
    ['computer without ip', f => { delete f.computers[0].ip }, /computers\[0\]\.ip must be an IPv4 or IPv6 address or a host name \(got nothing\)/],
    ['bad ip', f => { f.computers[0].ip = 'http://x' }, /computers\[0\]\.ip must be an IPv4 or IPv6 address or a host name/],
    ['duplicate computer id', f => { f.computers[1].id = 1 }, /computers\[1\]\.id 1 is already the id of computers\[0\]/],
    ['bad id', f => { f.computers[0].id = 'a b' }, /computers\[0\]\.id must be a whole number or a string/],
    ['fractional id', f => { f.gpus[0].id = 1.5 }, /gpus\[0\]\.id must be a whole number/],
    ['duplicate gpu id', f => { f.gpus[2].id = '1' }, /gpus\[2\]\.id 1 is already the id of gpus\[0\]/],
    ['unknown computer', f => { f.gpus[1].computer = 7 }, /gpus\[1\]\.computer names computer 7, which is not in computers/],
    ['misspelt field', f => { f.gpus[0].wieght = 1 }, /gpus\[0\] has unknown field "wieght"/],
    ['weight not a number', f => { f.gpus[0].weight = '1' }, /gpus\[0\]\.weight must be a number from -3\.402823466e\+38 to 3\.402823466e\+38 \(or null\) \(got "1"\)/],
    ['negative vram', f => { f.gpus[0].vram = -1 }, /gpus\[0\]\.vram must be a number of at least 0/],
    ['models not an object', f => { f.models = ['llama3'] }, /models must be an object/],
    ['unknown model list', f => { f.models.llm = [] }, /models has unknown field "llm"/],
    ['model listed twice', f => { f.models.diffusors.push('LLAMA3:latest') }, /models\.diffusors\[1\] "LLAMA3:latest" is already listed as models\.llms\[0\]/],
    ['star in models', f => { f.models.llms.push('*') }, /models\.llms\[2\] must name a model/],
    ['empty model name', f => { f.models.llms.push('') }, /models\.llms\[2\] must be a non-empty string/],
    ['wildcard without kind', f => { delete f.assignments[0].kind }, /assignments\[0\]\.kind is required when the model is '\*'/],
    ['bad kind', f => { f.assignments[0].kind = 'image' }, /assignments\[0\]\.kind must be one of "llm", "diffusor", "speech" \(got "image"\)/],
    ['unlisted model without kind', f => { delete f.assignments[3].kind }, /assignments\[3\]\.model "nomic-embed-text" is in none of models\.llms/],
    ['kind contradicts models', f => { f.assignments[2].kind = 'llm' }, /assignments\[2\]\.kind is "llm" but model "sdxl-turbo" is diffusor/],
    ['port 0', f => { f.assignments[0].port = 0 }, /assignments\[0\]\.port must be an integer from 1 to 65535 \(got 0\)/],
    ['port 65536', f => { f.assignments[0].port = 65536 }, /assignments\[0\]\.port must be an integer from 1 to 65535/],
    ['port as string', f => { f.assignments[0].port = '11434' }, /assignments\[0\]\.port must be an integer/],
    ['fractional port', f => { f.assignments[0].port = 80.5 }, /assignments\[0\]\.port must be an integer/],
    ['duplicate assignment id', f => { f.assignments[1].id = 1 }, /assignments\[1\]\.id 1 is already the id of assignments\[0\]/],
    ['duplicate assignment name', f => { f.assignments[1].name = 'ollama-any' }, /assignments\[1\]\.name "ollama-any" is already the name of assignments\[0\]/],
    ['no model', f => { delete f.assignments[1].model }, /assignments\[1\]\.model must be a non-empty string/],
    ['no gpus', f => { f.assignments[1].gpus = [] }, /assignments\[1\]\.gpus must name at least one entry/],
    ['gpus not an array', f => { f.assignments[1].gpus = 1 }, /assignments\[1\]\.gpus must be an array \(got 1\)/],
    ['unknown gpu', f => { f.assignments[1].gpus = [1, 9] }, /assignments\[1\]\.gpus\[1\] names gpu 9, which is not in gpus/],
    ['gpu twice', f => { f.assignments[1].gpus = [1, '1'] }, /assignments\[1\]\.gpus\[1\] names gpu 1 twice/],
    ['gpus on two computers', f => { f.assignments[1].gpus = [1, 3] }, /assignments\[1\]\.gpus must all be on one computer/],
    ['parallel 0', f => { f.assignments[1].parallel = 0 }, /assignments\[1\]\.parallel must be a whole number of at least 1 .*\(got 0\)/],
    ['drained not a boolean', f => { f.assignments[1].drained = 'yes' }, /assignments\[1\]\.drained must be true or false/],
    ['api key without its hash', f => { f.apiKeys = [{ name: 'ci' }] }, /apiKeys\[0\]\.sha256 must be the key's SHA-256 in hex/],
    ['api key with a secret in clear', f => { f.apiKeys = [{ name: 'ci', sha256: 'a'.repeat(64), key: 'sk-1' }] }, /apiKeys\[0\] has unknown field "key"/],
    ['api key priority', f => { f.apiKeys = [{ name: 'ci', sha256: 'a'.repeat(64), priority: 'urgent' }] }, /apiKeys\[0\]\.priority must be one of "high", "normal", "low"/]
  ]
  for (const [name, change, expected] of cases) {
    const f = clone()
    const replaced = change(f)
    t.throws(() => parseInventoryFile(replaced ?? f, 'src.json'), expected, name)
  }
})

t.test('file: loading from disk', async t => {
  const dir = t.testdir({
    'good.json': JSON.stringify(example),
    'broken.json': '{"computers": [',
    'invalid.json': JSON.stringify({ ...example, assignments: [{ ...example.assignments[0], port: 0 }] })
  })
  const snapshot = await loadInventoryFromFile(join(dir, 'good.json'))
  t.same(snapshot, parseInventoryFile(clone(), 'x'))
  await t.rejects(loadInventoryFromFile(join(dir, 'broken.json')), /^inventory .*broken\.json: not valid JSON/)
  await t.rejects(loadInventoryFromFile(join(dir, 'invalid.json')), /^inventory .*invalid\.json: assignments\[0\]\.port must be an integer/)
  await t.rejects(loadInventoryFromFile(join(dir, 'missing.json')), /^inventory .*missing\.json: cannot be read/)
  await writeFile(join(dir, 'empty.json'), '')
  await t.rejects(loadInventoryFromFile(join(dir, 'empty.json')), /not valid JSON/)
})
