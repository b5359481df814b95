import t from 'tap'
import { mariaDbUrlFromEnv, parseLegacyMariaDb, parseLegacyRedis } from '../services/config/connection-strings.js'

t.test('parseLegacyMariaDb', async t => {
  const ok: Array<[string, string]> = [
    ['Server=db;Port=3307;Database=maestro;User=u;Password=pw;', 'mysql://u:pw@db:3307/maestro'],
    ['server=db;database=maestro;uid=u;pwd=pw', 'mysql://u:pw@db:3306/maestro'],
    ['SERVER = db ; DATABASE = maestro ; USER ID = u ; PASSWORD = pw', 'mysql://u:pw@db:3306/maestro'],
    ['Host=10.0.0.5;Database=m;UserID=root', 'mysql://root@10.0.0.5:3306/m'],
    ['Server=db;Database=m;Username=u;Password=', 'mysql://u@db:3306/m'],
    ['Server=db;Database=m', 'mysql://db:3306/m'],
    ['Server=::1;Database=m;User=u', 'mysql://u@[::1]:3306/m'],
    ['Server=[fd00::2];Port=3306;Database=m;User=u', 'mysql://u@[fd00::2]:3306/m'],
    ['Server=db;Database=m;User=u;Password=p@ss:w/rd%', 'mysql://u:p%40ss%3Aw%2Frd%25@db:3306/m'],
    ['Server=db;Database=m;User=u;Password="a;b=c"', 'mysql://u:a%3Bb%3Dc@db:3306/m'],
    ["Server=db;Database=m;User=u;Password='it''s'", "mysql://u:it's@db:3306/m"],
    ['Server=db;Database=m;User=u;Password="say ""hi"""', 'mysql://u:say%20%22hi%22@db:3306/m'],
    ['Server=db;Database=my db;User=u', 'mysql://u@db:3306/my%20db'],
    ['Server=db;Database=m;User=u;SslMode=None;AllowPublicKeyRetrieval=True;', 'mysql://u@db:3306/m']
  ]
  for (const [input, url] of ok) {
    t.equal(parseLegacyMariaDb(input), url, input)
    const parsed = new URL(parseLegacyMariaDb(input))
    t.equal(parsed.protocol, 'mysql:')
  }
  t.equal(decodeURIComponent(new URL(parseLegacyMariaDb('Server=db;Database=m;User=u;Password="a;b=c"')).password), 'a;b=c',
    'the password survives the URL')

  const bad: Array<[string, RegExp]> = [
    ['', /connection string is empty/],
    ['   ', /connection string is empty/],
    ['Database=m;User=u', /names no Server/],
    ['Server=;Database=m', /names no Server/],
    ['Server=db;User=u', /names no Database/],
    ['Server=db;Database=m;Port=abc', /Port must be a port number from 1 to 65535 \(got "abc"\)/],
    ['Server=db;Database=m;Port=0', /Port must be a port number/],
    ['Server=db;Database=m;Port=70000', /Port must be a port number/],
    ['Server=db;Database=m;Password=pw', /has a Password but no User/],
    ['Server=a,b;Database=m', /several servers/],
    ['Server=db/x;Database=m', /Server is not a host name or address/],
    ['Server=db;Database=m;garbage', /part "garbage" is not key=value/],
    ['=x;Server=db;Database=m', /a value without a key/],
    ['Server=db;Database=m;Password="open', /value of Password has no closing "/],
    ['Server=db;Database=m;Password="a"b', /text after its closing quote/]
  ]
  for (const [input, message] of bad) t.throws(() => parseLegacyMariaDb(input), message, JSON.stringify(input))
})

t.test('parseLegacyRedis', async t => {
  const ok: Array<[string, string]> = [
    ['redis:6379', 'redis://redis:6379'],
    ['redis', 'redis://redis:6379'],
    ['10.0.0.7:6380,password=secret', 'redis://:secret@10.0.0.7:6380'],
    ['cache:6379, password = p@ss/w:rd ,ssl=false,abortConnect=false', 'redis://:p%40ss%2Fw%3Ard@cache:6379'],
    ['cache:6380,ssl=True,password=x', 'rediss://:x@cache:6380'],
    ['cache:6379,user=me,password=pw', 'redis://me:pw@cache:6379'],
    ['cache:6379,defaultDatabase=2', 'redis://cache:6379/2'],
    ['[::1]:6379', 'redis://[::1]:6379'],
    ['[::1]', 'redis://[::1]:6379'],
    ['abortConnect=false,cache:1234', 'redis://cache:1234']
  ]
  for (const [input, url] of ok) t.equal(parseLegacyRedis(input), url, input)

  const bad: Array<[string, RegExp]> = [
    ['', /connection string is empty/],
    ['password=x', /names no host:port/],
    ['cache:abc', /port must be a port number/],
    ['cache:0', /port must be a port number/],
    ['cache:6379,ssl=maybe', /ssl must be true or false/],
    ['a:1,b:2', /several endpoints/],
    [':6379', /names no host/],
    ['ca che:6379', /host is not a host name or address/],
    ['cache:6379,defaultDatabase=x', /defaultDatabase must be a number/]
  ]
  for (const [input, message] of bad) t.throws(() => parseLegacyRedis(input), message, JSON.stringify(input))
})

t.test('mariaDbUrlFromEnv', async t => {
  const legacy = 'Server=db;Database=m;User=u;Password=pw'
  t.equal(mariaDbUrlFromEnv({}), undefined, 'neither set')
  t.equal(mariaDbUrlFromEnv({ MARIADB_URL: '', ConnectionStrings__MariaDb: '' }), undefined, 'empty counts as unset')
  t.equal(mariaDbUrlFromEnv({ MARIADB_URL: '  ' }), undefined, 'blank counts as unset')
  t.equal(mariaDbUrlFromEnv({ MARIADB_URL: 'mysql://a:b@h:3306/d' }), 'mysql://a:b@h:3306/d')
  t.equal(mariaDbUrlFromEnv({ MARIADB_URL: 'mysql://a:b@h:3306/d', ConnectionStrings__MariaDb: legacy }), 'mysql://a:b@h:3306/d',
    'MARIADB_URL wins')
  t.equal(mariaDbUrlFromEnv({ MARIADB_URL: '', ConnectionStrings__MariaDb: legacy }), 'mysql://u:pw@db:3306/m',
    'legacy used when MARIADB_URL is empty')
  t.equal(mariaDbUrlFromEnv({ ConnectionStrings__MariaDb: legacy }), 'mysql://u:pw@db:3306/m')
  t.equal(mariaDbUrlFromEnv({ MARIADB_URL: 'mariadb://h/d' }), 'mariadb://h/d')
  t.throws(() => mariaDbUrlFromEnv({ MARIADB_URL: 'not a url' }), /^MARIADB_URL is not a URL/)
  t.throws(() => mariaDbUrlFromEnv({ MARIADB_URL: 'postgres://h/d' }), /^MARIADB_URL must start with mysql:\/\/ \(got postgres:\/\/\)/)
  t.throws(() => mariaDbUrlFromEnv({ ConnectionStrings__MariaDb: 'Server=db' }), /^ConnectionStrings__MariaDb: connection string names no Database$/)
})
