-- A labelling database at schema v1 (alignkit before the safety question), SQLite.
CREATE TABLE annotators (
	id INTEGER NOT NULL,
	name VARCHAR(100) NOT NULL,
	token_hash VARCHAR(64) NOT NULL,
	role VARCHAR(16) NOT NULL,
	revoked BOOLEAN NOT NULL,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (name),
	UNIQUE (token_hash)
);
CREATE TABLE prompts (
	id INTEGER NOT NULL,
	prompt_json TEXT NOT NULL,
	prompt_key VARCHAR(64) NOT NULL,
	category VARCHAR(200) NOT NULL,
	adversarial BOOLEAN NOT NULL,
	high_value BOOLEAN NOT NULL,
	flags_json TEXT NOT NULL,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (prompt_key)
);
CREATE TABLE responses (
	id INTEGER NOT NULL,
	prompt_id INTEGER NOT NULL,
	text TEXT NOT NULL,
	text_hash VARCHAR(64) NOT NULL,
	kind VARCHAR(16) NOT NULL,
	model VARCHAR(500) NOT NULL,
	settings_json TEXT NOT NULL,
	seed INTEGER,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (prompt_id, text_hash),
	FOREIGN KEY(prompt_id) REFERENCES prompts (id)
);
CREATE INDEX ix_responses_prompt_id ON responses (prompt_id);
CREATE TABLE tasks (
	id INTEGER NOT NULL,
	prompt_id INTEGER NOT NULL,
	response_a_id INTEGER NOT NULL,
	response_b_id INTEGER NOT NULL,
	target INTEGER NOT NULL,
	assigned INTEGER NOT NULL,
	submitted INTEGER NOT NULL,
	is_gold BOOLEAN NOT NULL,
	strategy VARCHAR(32) NOT NULL,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (response_a_id, response_b_id),
	FOREIGN KEY(prompt_id) REFERENCES prompts (id),
	FOREIGN KEY(response_a_id) REFERENCES responses (id),
	FOREIGN KEY(response_b_id) REFERENCES responses (id)
);
CREATE INDEX ix_tasks_is_gold ON tasks (is_gold);
CREATE INDEX ix_tasks_prompt_id ON tasks (prompt_id);
CREATE TABLE assignments (
	id INTEGER NOT NULL,
	task_id INTEGER NOT NULL,
	annotator_id INTEGER NOT NULL,
	status VARCHAR(16) NOT NULL,
	left_is_a BOOLEAN NOT NULL,
	served_at DATETIME NOT NULL,
	lease_expires_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (task_id, annotator_id),
	FOREIGN KEY(task_id) REFERENCES tasks (id),
	FOREIGN KEY(annotator_id) REFERENCES annotators (id)
);
CREATE INDEX ix_assignments_annotator_id ON assignments (annotator_id);
CREATE INDEX ix_assignments_lease_expires_at ON assignments (lease_expires_at);
CREATE INDEX ix_assignments_status ON assignments (status);
CREATE INDEX ix_assignments_task_id ON assignments (task_id);
CREATE TABLE gold (
	task_id INTEGER NOT NULL,
	answer VARCHAR(4) NOT NULL,
	kind VARCHAR(16) NOT NULL,
	PRIMARY KEY (task_id),
	FOREIGN KEY(task_id) REFERENCES tasks (id)
);
CREATE TABLE annotations (
	id INTEGER NOT NULL,
	assignment_id INTEGER NOT NULL,
	task_id INTEGER NOT NULL,
	annotator_id INTEGER NOT NULL,
	idempotency_key VARCHAR(64) NOT NULL,
	choice VARCHAR(4) NOT NULL,
	confidence INTEGER NOT NULL,
	reason TEXT NOT NULL,
	left_is_a BOOLEAN NOT NULL,
	served_at DATETIME NOT NULL,
	submitted_at DATETIME NOT NULL,
	seconds FLOAT NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (assignment_id),
	FOREIGN KEY(assignment_id) REFERENCES assignments (id),
	FOREIGN KEY(task_id) REFERENCES tasks (id),
	FOREIGN KEY(annotator_id) REFERENCES annotators (id),
	UNIQUE (idempotency_key)
);
CREATE INDEX ix_annotations_annotator_id ON annotations (annotator_id);
CREATE INDEX ix_annotations_task_id ON annotations (task_id);
CREATE TABLE alignkit_schema (version INTEGER NOT NULL);
INSERT INTO alignkit_schema VALUES (1);
INSERT INTO prompts VALUES (1, '"What is 2+2?"', 'k1', 'math', 0, 0, '{}', '2026-01-01 00:00:00');
INSERT INTO responses VALUES (1, 1, '4', 'h1', 'model', 'runs/sft', '{}', 0, '2026-01-01 00:00:00');
INSERT INTO responses VALUES (2, 1, 'five', 'h2', 'model', 'runs/dpo', '{}', 0, '2026-01-01 00:00:00');
INSERT INTO tasks VALUES (1, 1, 1, 2, 1, 1, 1, 0, 'random', '2026-01-01 00:00:00');
INSERT INTO annotators VALUES (1, 'ann', 'hash1', 'annotator', 0, '2026-01-01 00:00:00');
INSERT INTO assignments VALUES (1, 1, 1, 'submitted', 1, '2026-01-01 00:00:00', '2026-01-01 00:30:00');
INSERT INTO annotations VALUES (1, 1, 1, 1, 'key-1', 'a', 4, '', 1, '2026-01-01 00:00:00', '2026-01-01 00:00:09', 9.0);
