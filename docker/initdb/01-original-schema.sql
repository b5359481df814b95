-- Inventory schema of an existing ai-maestro deployment, table for table and column for column.
-- MariaDB's image runs this file once, when its data directory is first created
-- (mounted into /docker-entrypoint-initdb.d). Do not change it: the gateway must work on exactly
-- this. The gateway's own changes live in services/migrations.ts (`npm run migrate`) and only add
-- or widen, never drop or rename.
-- (Deployments made on MySQL 8 used the utf8mb4_0900_ai_ci collation; MariaDB uses its default.)

CREATE TABLE computers (
  id      INT AUTO_INCREMENT NOT NULL,
  name    VARCHAR(100) NOT NULL,
  ip_addr VARCHAR(15)  NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE gpus (
  id          INT AUTO_INCREMENT NOT NULL,
  name        VARCHAR(100) NOT NULL,
  vram_size   FLOAT NOT NULL,
  computer_id INT NOT NULL,
  weight      FLOAT NULL,
  PRIMARY KEY (id),
  FOREIGN KEY (computer_id) REFERENCES computers (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- models by kind: llms are served by Ollama, diffusors by Stable Diffusion servers
CREATE TABLE llms (
  name VARCHAR(100) NOT NULL,
  size DOUBLE NOT NULL,
  PRIMARY KEY (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE diffusors (
  name VARCHAR(100) NOT NULL,
  size DOUBLE NOT NULL,
  PRIMARY KEY (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE speech_models (
  name VARCHAR(100) NOT NULL,
  PRIMARY KEY (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- an assignment is one upstream server, reached at http://<ip_addr of its GPUs' computer>:<port>,
-- serving model_name on the GPUs linked to it in assignment_gpus
CREATE TABLE assignments (
  id         INT AUTO_INCREMENT NOT NULL,
  name       VARCHAR(100) NOT NULL,
  model_name VARCHAR(100) NOT NULL,
  port       INT NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE assignment_gpus (
  assignment_id INT NOT NULL,
  gpu_id        INT NOT NULL,
  PRIMARY KEY (assignment_id, gpu_id),
  FOREIGN KEY (assignment_id) REFERENCES assignments (id),
  FOREIGN KEY (gpu_id) REFERENCES gpus (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
